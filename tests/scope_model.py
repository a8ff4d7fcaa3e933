"""A reference model of the documented scope rules, and random programs to
compare it with (tests/test_model.py).

A program is a list of operations; scopes hold bodies of operations. The model
interprets a program with plain lists and sets standing for transactions and
savepoints; the real run interprets the same program with sessionscope against
a real database. Both report the committed rows, the ``on_commit`` callbacks
run (in order) and how each top-level operation ended.

The rules the model encodes are those of docs/design.md ("Scope integrity"):
propagation, rollback-only marking, savepoints, ``set_rollback``, the body's
own ``commit()``/``rollback()``, callbacks, generators (a scope opened in a
generator is private to it) and, for asyncio, child tasks (independent) and
``asyncio.wait_for`` (joins on every Python version).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

PROPAGATIONS = ("required", "nested", "requires_new", "mandatory", "never")
NON_CONCURRENT = ("required", "nested", "mandatory", "never")


@dataclass
class Write:
    name: str = ""


@dataclass
class SetRollback:
    pass


@dataclass
class Commit:
    pass


@dataclass
class Rollback:
    pass


@dataclass
class OnCommit:
    tag: str = ""


@dataclass
class Scope:
    propagation: str
    body: list[Op]
    fail: bool  # raise Boom at the end of the body
    caught: bool  # the enclosing body catches what escapes
    decorated: bool  # a decorated function rather than a with block
    wait_for: bool = False  # (async) the decorated call runs under asyncio.wait_for


@dataclass
class Gen:
    propagation: str
    body: list[Op]  # runs in the generator before it yields
    between: list[Op]  # runs in the caller while the generator is suspended
    finish: bool  # resume it to the end, else abandon it (close)
    caught: bool


@dataclass
class Child:
    body: list[Op]  # (async) a decorated call in a child task, awaited with gather
    fail: bool
    caught: bool


Op = Write | SetRollback | Commit | Rollback | OnCommit | Scope | Gen | Child


@dataclass
class Program:
    ops: list[Op]
    names: list[str] = field(default_factory=list)


# -- generation ---------------------------------------------------------------------


def _ops(draw: st.DrawFn, depth: int, is_async: bool, in_scope: bool, concurrent: bool) -> list[Op]:
    count = draw(st.integers(0, 4 if depth < 2 else 2))
    ops: list[Op] = []
    propagations = PROPAGATIONS if concurrent else NON_CONCURRENT
    for _ in range(count):
        kinds = ["scope"]
        if in_scope or concurrent:
            kinds.append("gen")
        if in_scope:
            kinds += ["write", "write", "write", "set_rollback", "commit", "rollback", "on_commit"]
        if is_async and concurrent:
            kinds.append("child")
        if depth >= 3:
            kinds = [k for k in kinds if k not in ("scope", "gen", "child")] or ["write"]
            if not in_scope:
                break
        kind = draw(st.sampled_from(kinds))
        if kind == "write":
            ops.append(Write())
        elif kind == "set_rollback":
            ops.append(SetRollback())
        elif kind == "commit":
            ops.append(Commit())
        elif kind == "rollback":
            ops.append(Rollback())
        elif kind == "on_commit":
            ops.append(OnCommit())
        elif kind == "scope":
            ops.append(
                Scope(
                    propagation=draw(st.sampled_from(propagations)),
                    body=_ops(draw, depth + 1, is_async, True, concurrent),
                    fail=draw(st.booleans()),
                    caught=draw(st.booleans()) or not in_scope,
                    decorated=draw(st.booleans()),
                    wait_for=is_async and draw(st.booleans()),
                )
            )
        elif kind == "gen":
            ops.append(
                Gen(
                    propagation=draw(
                        st.sampled_from(
                            ("required", "requires_new", "nested")
                            if concurrent
                            else ("required", "nested")
                        )
                    ),
                    body=_ops(draw, depth + 1, is_async, True, concurrent),
                    between=_ops(draw, depth + 1, is_async, in_scope, concurrent),
                    finish=draw(st.booleans()),
                    caught=draw(st.booleans()) or not in_scope,
                )
            )
        else:
            ops.append(
                Child(
                    body=_ops(draw, depth + 1, is_async, True, concurrent),
                    fail=draw(st.booleans()),
                    caught=draw(st.booleans()) or not in_scope,
                )
            )
    return ops


def _name(ops: list[Op], counter: list[int]) -> None:
    for op in ops:
        if isinstance(op, (Write, OnCommit)):
            counter[0] += 1
            if isinstance(op, Write):
                op.name = f"w{counter[0]}"
            else:
                op.tag = f"c{counter[0]}"
        elif isinstance(op, (Scope, Child)):
            _name(op.body, counter)
        elif isinstance(op, Gen):
            _name(op.body, counter)
            _name(op.between, counter)


@st.composite
def programs(draw: st.DrawFn, is_async: bool, concurrent: bool = True) -> Program:
    """Random programs; ``concurrent=False`` leaves out what holds two sessions
    open at once (``requires_new``, child tasks, a generator with a session of
    its own), which SQLite's single writer lock cannot serve."""
    ops = _ops(draw, 0, is_async, False, concurrent)
    _name(ops, [0])
    return Program(ops)


# -- the model ----------------------------------------------------------------------


class ModelError(Exception):
    """An exception of the modelled program: ``kind`` names its class."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


ABANDONED = ModelError("GeneratorExit")

NEW, JOIN, SAVEPOINT = "new", "join", "savepoint"
DOOMED, ROLLBACK_ONLY, SPOILED = 1, 2, 3


class MSession:
    def __init__(self) -> None:
        self.layers: list[list[str]] = [[]]  # the transaction, then one per savepoint
        self.in_tx = False


class MFrame:
    def __init__(self, kind: str, session: MSession, parent: MFrame | None) -> None:
        self.kind = kind
        self.session = session
        self.parent = parent
        self.owner: MFrame | None = self if kind != JOIN else (parent.owner if parent else None)
        self.root: MFrame = self if kind == NEW else parent.root  # type: ignore[union-attr]
        self.veto = 0
        self.callbacks: list[str] = []
        self.due: list[str] = []
        self.inner: list[MFrame] = []
        self.closed = False
        self.hidden = False
        self.detached = False


class Model:
    """Interprets a program by the documented rules."""

    def __init__(self) -> None:
        self.committed: set[str] = set()
        self.ran: list[str] = []

    def run(self, program: Program) -> list[str | None]:
        outcomes: list[str | None] = []
        for op in program.ops:
            try:
                self._op(op, [])
                outcomes.append(None)
            except ModelError as err:
                outcomes.append(err.kind)
        return outcomes

    # -- frames

    def _visible(self, stack: list[MFrame]) -> MFrame | None:
        for frame in reversed(stack):
            if not frame.closed and not frame.hidden:
                return frame
        return None

    def _enter(self, propagation: str, stack: list[MFrame], generator: bool) -> MFrame:
        outer = self._visible(stack)
        if propagation == "requires_new":
            kind = NEW
        elif outer is None:
            if propagation == "mandatory":
                raise ModelError("NoActiveScopeError")
            kind = NEW
        elif propagation == "never":
            raise ModelError("ActiveScopeError")
        elif propagation == "nested":
            kind = SAVEPOINT
        else:
            kind = JOIN
        # A generator's own savepoint is on a transaction its caller keeps using
        # between iterations (a nested scope there always has an outer one):
        # refused.
        if kind == SAVEPOINT and generator:
            raise ModelError("ActiveScopeError")
        if kind == NEW:
            frame = MFrame(NEW, MSession(), outer)
        else:
            assert outer is not None
            frame = MFrame(kind, outer.session, outer)
            frame.root.inner.append(frame)
            if kind == SAVEPOINT:
                frame.session.layers.append([])
                frame.session.in_tx = True
        stack.append(frame)
        return frame

    def _mark(self, owner: MFrame | None, veto: int) -> None:
        if owner is not None and owner.veto < veto:
            owner.veto = veto

    def _exit(self, frame: MFrame, exc: ModelError | None, stack: list[MFrame]) -> None:
        if frame in stack:
            stack.remove(frame)
        frame.closed = True
        if frame.kind != NEW and frame in frame.root.inner:
            frame.root.inner.remove(frame)
        if frame.kind == JOIN:
            if exc is not None and exc is not ABANDONED:
                self._mark(frame.owner, ROLLBACK_ONLY)
            return
        session = frame.session
        if frame.kind == SAVEPOINT:
            keep = exc is None and frame.veto == 0
            target = frame.parent.owner if frame.parent is not None else None
            if frame.detached:
                if keep:
                    if target is not None:
                        target.callbacks.extend(frame.callbacks)
                    return
                frame.callbacks = []
                self._mark(target, ROLLBACK_ONLY)
                if exc is None and frame.veto == ROLLBACK_ONLY:
                    raise ModelError("RollbackOnlyError")
                return
            top = session.layers.pop()
            if keep:
                session.layers[-1].extend(top)
                if target is not None:
                    target.callbacks.extend(frame.callbacks)
                return
            frame.callbacks = []
            if exc is None and frame.veto == ROLLBACK_ONLY:
                raise ModelError("RollbackOnlyError")
            return
        # NEW
        assert len(session.layers) == 1, session.layers
        if exc is None and frame.veto in (ROLLBACK_ONLY, SPOILED):
            self.ran.extend(frame.due)
            raise ModelError("RollbackOnlyError")
        if exc is None and frame.veto == 0:
            self.committed.update(session.layers[0])
            self.ran.extend(frame.due + frame.callbacks)
            return
        self.ran.extend(frame.due)

    # -- operations

    def _body(self, ops: list[Op], stack: list[MFrame]) -> None:
        for op in ops:
            self._op(op, stack)

    def _op(self, op: Op, stack: list[MFrame]) -> None:
        if isinstance(op, Scope):
            try:
                self._scope(op.propagation, op.body, op.fail, stack)
            except ModelError:
                if not op.caught:
                    raise
            return
        if isinstance(op, Gen):
            try:
                self._gen(op, stack)
            except ModelError:
                if not op.caught:
                    raise
            return
        if isinstance(op, Child):
            try:
                self._scope("required", op.body, op.fail, [])
            except ModelError:
                if not op.caught:
                    raise
            return
        frame = self._visible(stack)
        assert frame is not None, "session operations are generated inside scopes"
        session, root = frame.session, frame.root
        if isinstance(op, Write):
            session.layers[-1].append(op.name)
            session.in_tx = True
        elif isinstance(op, SetRollback):
            self._mark(frame.owner, DOOMED)
        elif isinstance(op, OnCommit):
            assert frame.owner is not None
            frame.owner.callbacks.append(op.tag)
        elif isinstance(op, Commit):
            owners = [root] + [f for f in root.inner if f.kind == SAVEPOINT]
            if any(f.veto for f in owners):
                raise ModelError("RollbackOnlyError")
            for layer in session.layers:
                self.committed.update(layer)
            for f in [root, *root.inner]:
                root.due.extend(f.callbacks)
                f.callbacks = []
            self._end_transaction(session, root)
        elif isinstance(op, Rollback):
            if not session.in_tx:
                return
            for f in [root, *root.inner]:
                f.callbacks = []
            if root.inner:
                self._mark(root, SPOILED)
            elif root.veto == ROLLBACK_ONLY:
                root.veto = 0
            self._end_transaction(session, root)

    def _end_transaction(self, session: MSession, root: MFrame) -> None:
        session.layers = [[]]
        session.in_tx = False
        for f in root.inner:
            if f.kind == SAVEPOINT:
                f.detached = True

    def _scope(self, propagation: str, body: list[Op], fail: bool, stack: list[MFrame]) -> None:
        # Not entered in a generator: the programs open every scope (but a
        # generator's own) in a plain function or coroutine with a with statement
        # (or a decorated call), which ends it before it returns, so the
        # generator that called it cannot yield while it is open. The generator
        # rule is for the generator's own scope (docs/design.md).
        frame = self._enter(propagation, stack, False)
        try:
            self._body(body, stack)
            if fail:
                raise ModelError("Boom")
        except ModelError as err:
            self._exit(frame, err, stack)
            raise
        self._exit(frame, None, stack)

    def _gen(self, op: Gen, stack: list[MFrame]) -> None:
        frame = self._enter(op.propagation, stack, True)
        try:
            self._body(op.body, stack)
        except ModelError as err:
            self._exit(frame, err, stack)
            raise
        frame.hidden = True  # suspended at its yield
        try:
            self._body(op.between, stack)
        except ModelError:
            frame.hidden = False
            self._exit(frame, ABANDONED, stack)
            raise
        frame.hidden = False
        self._exit(frame, None if op.finish else ABANDONED, stack)
