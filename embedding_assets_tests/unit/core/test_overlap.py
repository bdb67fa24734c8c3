"""Two overlapped stages: the next key is prepared on a helper thread while the caller's
thread finishes the previous one; outcomes come in key order; a failure ends one key."""

import threading
import time

from embedding_assets.core.overlap import overlapped


def test_the_next_key_is_prepared_while_this_one_is_finished():
    caller = threading.get_ident()
    events: list[tuple[str, str, float]] = []

    def prepare(key: str) -> str:
        assert threading.get_ident() != caller
        events.append(("prepare start", key, time.perf_counter()))
        time.sleep(0.2)
        events.append(("prepare end", key, time.perf_counter()))
        return key.upper()

    def finish(key: str, prepared: str) -> str:
        assert threading.get_ident() == caller
        events.append(("finish start", key, time.perf_counter()))
        time.sleep(0.2)
        events.append(("finish end", key, time.perf_counter()))
        return prepared + "!"

    started = time.perf_counter()
    outcomes = list(overlapped(["a", "b", "c"], prepare, finish))
    elapsed = time.perf_counter() - started
    assert [(o.key, o.value, o.error) for o in outcomes] == [
        ("a", "A!", None),
        ("b", "B!", None),
        ("c", "C!", None),
    ]
    when = {(what, key): t for what, key, t in events}
    # b is being prepared while a is finished: b's preparation starts before a's finish ends
    assert when[("prepare start", "b")] < when[("finish end", "a")]
    assert when[("prepare start", "c")] < when[("finish end", "b")]
    assert elapsed < 1.0  # six 0.2 s steps, four of them overlapped (serially: 1.2 s)


def test_a_failing_stage_ends_that_key_only():
    def prepare(key: str) -> str:
        if key == "b":
            raise ValueError("bad row")
        return key

    def finish(key: str, prepared: str) -> str:
        if key == "c":
            raise RuntimeError("store down")
        return prepared

    outcomes = {o.key: o for o in overlapped(["a", "b", "c", "d"], prepare, finish)}
    assert outcomes["a"].value == "a" and outcomes["d"].value == "d"
    assert isinstance(outcomes["b"].error, ValueError) and outcomes["b"].stage == "prepare"
    assert isinstance(outcomes["c"].error, RuntimeError) and outcomes["c"].stage == "finish"


def test_before_prepare_runs_on_the_callers_thread_and_its_failure_is_the_keys():
    caller = threading.get_ident()
    seen: list[str] = []

    def before(key: str) -> str:
        assert threading.get_ident() == caller
        seen.append(key)
        if key == "b":
            raise LookupError("no runtime")
        return f"<{key}>"

    outcomes = list(overlapped(["a", "b"], lambda arg: arg, lambda _k, p: p, before))
    assert seen == ["a", "b"]
    assert outcomes[0].value == "<a>"
    assert isinstance(outcomes[1].error, LookupError) and outcomes[1].stage == "prepare"


def test_no_keys_and_one_key():
    assert list(overlapped([], lambda k: k, lambda k, p: p)) == []
    assert [o.value for o in overlapped(["x"], lambda k: k * 2, lambda k, p: p)] == ["xx"]
