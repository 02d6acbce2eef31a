"""``scheduler.__all__`` is exactly the public API."""

from __future__ import annotations

import scheduler


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(scheduler) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(scheduler, name)).__name__ == "module"}
    assert set(scheduler.__all__) == public - modules - {"version", "PackageNotFoundError"}
    assert scheduler.__all__ == sorted(scheduler.__all__)


def test_every_exception_derives_from_the_root() -> None:
    for name in scheduler.__all__:
        obj = getattr(scheduler, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, scheduler.SchedulerError), name
