"""A mypy plugin that types actor method calls: ``handle.add`` is
``Callable[<add's parameters without self>, offload.Future[<add's return type>]]``.

Enable it in the mypy configuration::

    [tool.mypy]
    plugins = ["offload.mypy_plugin"]

Why a plugin: a handle's methods are found at run time (``ActorHandle.__getattr__``),
and Python's type system cannot map a class's methods to methods of another type that
return futures, so without the plugin ``handle.add`` is ``Any``. The plugin hooks that
``__getattr__``: for ``ActorHandle[Counter]`` and the name ``add`` it looks up
``Counter.add``, binds ``self`` and wraps the return type in ``offload.Future``. A name
that is not a public method of the actor class (an attribute, a property, a private or
unknown name) is an error, as it is at run time.

Without the plugin, ``handle.call(Counter.add, 2)`` is typed by plain typing
(``Future[int]``).
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.nodes import Decorator, FuncBase, MemberExpr, OverloadedFuncDef, TypeInfo
from mypy.plugin import AttributeContext, Plugin
from mypy.subtypes import find_member
from mypy.types import (
    AnyType,
    CallableType,
    Instance,
    Overloaded,
    ProperType,
    Type,
    TypeOfAny,
    get_proper_type,
)

HANDLE = "offload.actor.ActorHandle"
FUTURE = "offload.Future"


class OffloadPlugin(Plugin):
    """Types ``ActorHandle[A].<method>`` from ``A.<method>``."""

    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        if fullname.startswith(HANDLE + "."):
            return _actor_method
        return None


def _is_method(info: TypeInfo, name: str) -> str | None:
    """None if ``name`` is a public method of the class ``info``; else what it is."""
    if name.startswith("_"):
        return "a private name"
    symbol = info.get(name)
    if symbol is None or symbol.node is None:
        return "nothing of that name"
    node = symbol.node
    if isinstance(node, Decorator):
        return "a property" if node.func.is_property else None
    if isinstance(node, OverloadedFuncDef):
        return "a property" if node.is_property else None
    if isinstance(node, FuncBase):
        return None
    return "an attribute"


def _actor_method(ctx: AttributeContext) -> Type:
    handle = get_proper_type(ctx.type)
    if not isinstance(handle, Instance) or not handle.args:
        return ctx.default_attr_type
    actor = get_proper_type(handle.args[0])
    if not isinstance(actor, Instance) or not isinstance(ctx.context, MemberExpr):
        return ctx.default_attr_type  # an actor type mypy does not know: stay Any
    name = ctx.context.name
    if handle.type.get(name) is not None:
        return ctx.default_attr_type  # the handle's own (pid, shutdown, ...): the hook
        # runs for every attribute of the class, not only those __getattr__ finds
    cls = actor.type.name
    problem = _is_method(actor.type, name)
    member = find_member(name, actor, actor) if problem is None else None
    bound = get_proper_type(member) if member is not None else None
    if problem is None and not isinstance(bound, (CallableType, Overloaded)):
        problem = "not callable"
    if problem is not None or bound is None:
        ctx.api.fail(
            f'"{cls}" actor handle has no method "{name}" ({cls}.{name}: {problem}); a '
            "handle only calls the class's public methods",
            ctx.context,
        )
        return AnyType(TypeOfAny.from_error)
    return _returning_future(ctx, bound)


def _returning_future(ctx: AttributeContext, method: ProperType) -> Type:
    def wrap(item: CallableType) -> CallableType:
        # By its public name: named_generic_type looks "offload.client.future.Future"
        # up through "offload"'s attributes, where "client" is not one.
        return item.copy_modified(ret_type=ctx.api.named_generic_type(FUTURE, [item.ret_type]))

    if isinstance(method, Overloaded):
        return Overloaded([wrap(item) for item in method.items])
    assert isinstance(method, CallableType)
    return wrap(method)


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point: the plugin class (for every mypy version this was tried with,
    1.x and 2.x)."""
    return OffloadPlugin
