"""The extension contract: control methods are declared on the class and found bound, and an
extension that subclasses `Extension` gets every hook it does not implement as a no-op."""

from __future__ import annotations

from typing import Any

from peerd.host import Extension, control_method, control_methods


class _Base(Extension):
    events = ("base.done",)

    @control_method("v1.base")
    async def base(self, params: dict[str, Any], conn: Any) -> str:
        return f"base {self.tag}"

    def __init__(self, tag: str) -> None:
        self.tag = tag


class _Child(_Base):
    @control_method("v1.child")
    async def child(self, params: dict[str, Any], conn: Any) -> Any:
        return params["x"]

    async def helper(self) -> None:  # not a control method
        return None


async def test_control_methods_are_declared_and_bound() -> None:
    ext = _Child("one")
    methods = control_methods(ext)
    assert sorted(methods) == ["v1.base", "v1.child"]
    assert await methods["v1.base"]({}, None) == "base one"
    assert await methods["v1.child"]({"x": 7}, None) == 7
    # Bound per object: two extensions of one class do not share handlers.
    assert await control_methods(_Child("two"))["v1.base"]({}, None) == "base two"


async def test_hooks_default_to_nothing() -> None:
    ext = _Child("x")
    assert await ext.run() is None
    await ext.session_up("peer")
    ext.session_down("peer", "gone")
    ext.trust_changed()
    assert await ext.peers_with_work() == set()
    assert ext.status() == {}
    assert ext.events == ("base.done",)
