"""`commhub test`: conversation test files run in process, without a nats-server.

The built-in workflows' own test files (workflows/tests/) must pass; a wrong
expectation must fail with a readable diff (turn, test, FILE:LINE, expected and got)
and a JUnit file; a broken test file gets one line naming FILE:LINE; whether a human
agent is there is the test's to say (`agents:`, `agent:`), and decides the handoff.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from commhub.core.cli import main
from commhub.core.conversation.hubtest import HubBackend
from commhub.core.conversation.testfile import TestFileError, parse_test_file

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN_TESTS = ROOT / "workflows" / "tests"

WRONG = """\
tests:
  - test: books a table
    steps:
      - user: I'd like to book a table
      - bot: How many people is the table for?
      - user: "4"
      - bot: Which day?
      - state: ask_day
  - test: cancels
    steps:
      - user: I want to make a reservation
      - user: stop
      - events: [cancelled]
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module: the classifier trains once, then loads from
    its cache in {data_dir}/models."""
    return tmp_path_factory.mktemp("data")


def test_the_built_in_workflows_pass_their_conversation_tests(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`commhub test workflows/tests/` passes: every built-in workflow has a test file
    and every test in it passes (exit status 0)."""
    status = main(["test", str(BUILT_IN_TESTS), "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert status == 0, out
    for name in ("book_table", "fallback", "order_status", "support_request", "smalltalk"):
        assert f"{name}.yaml: " in out, out
    assert "failed" not in out and "skipped" not in out


def test_a_wrong_expectation_fails_with_a_readable_diff_and_a_junit_file(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reply that differs fails its test at that turn: the report names the test, the
    turn and its input, the expectation's FILE:LINE, what was expected and what came;
    the other test still passes; the exit status is 1 and the JUnit file says the same."""
    path = tmp_path / "wrong.yaml"
    path.write_text(WRONG)
    junit = tmp_path / "junit.xml"
    status = main(["test", str(path), "--data-dir", str(data_dir), "--junit", str(junit)])
    out = capsys.readouterr().out
    assert status == 1
    diff = (
        f"FAIL {path}:2: books a table\n"
        f"  turn 2 at {path}:6: user: 4\n"
        f"    {path}:7: reply 1\n"
        f"      expected: Which day?\n"
        f"      got:      Which day would you like to come? (today, tomorrow, next friday, or a "
        f"date like 14/06/2025)\n"
    )
    assert diff in out, out
    assert f"{path}: 1 passed, 1 failed" in out
    assert "1 passed, 1 failed in " in out

    suites = ET.parse(junit).getroot()
    assert (suites.get("tests"), suites.get("failures")) == ("2", "1")
    cases = {case.get("name"): case for case in suites.iter("testcase")}
    failure = cases["books a table"].find("failure")
    assert failure is not None and failure.get("message") == "turn 2: reply 1"
    assert failure.text is not None and diff.rstrip("\n") in failure.text
    assert cases["cancels"].find("failure") is None
    assert cases["books a table"].get("line") == "2"


AGENTS = """\
tests:
  - test: nobody is there
    steps:
      - user: blorp
      - user: I just want to talk to a human
      - bot: Let me hand you over to a colleague, who will answer you here shortly.
  - test: an agent is there
    agents: present
    steps:
      - user: blorp
      - user: I just want to talk to a human
      - bot: Let me hand you over to a colleague, who will answer you here shortly.
      - state: waiting_for_agent
  - test: an agent comes, then goes
    steps:
      - user: blorp
      - agent: joins
      - silent: true
      - user: I just want to talk to a human
      - state: waiting_for_agent
      - agent: leaves
      - wait: 61s
      - bot: {regex: "^Sorry, no colleague could take your conversation"}
"""


def test_the_agents_option_decides_the_handoff_and_a_wrong_guess_reads_as_a_diff(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A test starts with no human agent there, as a hub nobody staffs: a handoff it
    expects anyway fails at that turn with the reply that came instead. `agents:
    present` and `agent: joins` make one available, `agent: leaves` takes it away (the
    handoff it had stays, and times out after 60 s). Against a hub, which sees its real
    agents, tests that say either are skipped."""
    path = tmp_path / "agents.yaml"
    path.write_text(AGENTS)
    status = main(["test", str(path), "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert status == 1
    assert (
        f"FAIL {path}:2: nobody is there\n"
        f"  turn 2 at {path}:5: user: I just want to talk to a human\n"
        f"    {path}:6: reply 1\n"
        f"      expected: Let me hand you over to a colleague, who will answer you here "
        f"shortly.\n"
        f"      got:      Sorry, I still don't understand, and no colleague is available "
        f"right now. I can help with:\n"
    ) in out, out
    assert f"{path}: 2 passed, 1 failed" in out

    parsed = parse_test_file(AGENTS, "agents.yaml").tests
    assert [(t.agents, t.agents_given) for t in parsed] == [
        (False, False), (True, True), (False, False)]
    joins = parse_test_file("tests:\n  - test: t\n    steps:\n      - user: blorp\n"
                            "      - agent: joins\n", "joins.yaml").tests[0]
    hub = HubBackend("ws://127.0.0.1:1")
    try:
        reasons = [hub.skip_reason(t) for t in (parsed[0], parsed[1], joins)]
    finally:
        hub.close()
    assert reasons[0] is None
    assert reasons[1] == reasons[2] == (
        "'agents:' and 'agent:' play the human agents, which only the in-process run can "
        "do (a hub sees the real agents' heartbeats)")


SETTINGS_TESTS = """\
tests:
  - test: tomorrow is read on the test's clock in the hub's time zone
    steps:
      - user: Table for four tomorrow at 8pm
      - bot: Under which name should I book it?
      - slots: {party_size: 4, day: 2030-01-03, time: "20:00"}
  - test: the hub's own greeting
    steps:
      - user: hello
      - bot: {regex: "^Kia ora from Resto"}
  - test: a hub that does not ask who is there hands over
    steps:
      - user: blorp
      - user: I just want to talk to a human
      - state: waiting_for_agent
"""


def test_the_hubs_time_zone_small_talk_and_handoff_settings_apply(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings the router applies around the rules apply in process too: entities
    are read in `timezone` (at 2030-01-01 12:00 UTC it is already the 2nd in Auckland,
    so tomorrow is the 3rd), `smalltalk` replaces a reply, and `handoff_needs_agent =
    false` hands over with nobody announced."""
    config = tmp_path / "commhub.toml"
    config.write_text('timezone = "Pacific/Auckland"\nhandoff_needs_agent = false\n'
                      '[smalltalk]\ngreeting = "Kia ora from Resto! I can help with:"\n')
    path = tmp_path / "settings.yaml"
    path.write_text(SETTINGS_TESTS)
    status = main(["test", str(path), "--config", str(config), "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"{path}: 3 passed" in out


def test_try_says_small_talk_is_answered_without_classifying(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`commhub try` runs the same rules as `commhub test`: a greeting is small talk,
    not a text the fallback gets."""
    assert main(["try", "hello", "thanks", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out == (
        "'hello'\n"
        "  -> small talk (greeting): answered with \"Hello! I can help with:\" and the start "
        "buttons; not classified\n\n"
        "'thanks'\n"
        "  -> small talk (thanks): answered with \"You're welcome!\"; not classified\n")


def test_a_button_never_shown_fails_naming_the_buttons_that_were(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pressing a button by a title no reply offered fails the turn and lists the
    buttons that were offered."""
    path = tmp_path / "press.yaml"
    path.write_text("tests:\n  - test: presses\n    steps:\n      - user: blorp\n"
                    "      - press: Order a pizza\n")
    assert main(["test", str(path), "--data-dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert f"  turn 2 at {path}:5: press: Order a pizza\n" in out
    assert ("      got:      no such button (buttons shown: Book a table at the restaurant, "
            "Check the status of an order, Report a problem to customer support)") in out


def test_a_broken_test_file_is_one_line_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken file stops the run before anything is trained: `commhub: error:
    FILE:LINE: problem`, exit status 1, no traceback."""
    path = tmp_path / "broken.yaml"
    path.write_text("tests:\n  - test: t\n    steps:\n      - user: hi\n      - bott: Hi\n")
    assert main(["test", str(path), "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err == (f"commhub: error: {path}:5: unknown step 'bott' (expected one of: user, "
                   "press, event, answer, wait, agent, bot, silent, classified, workflow, "
                   "state, slots, events)\n")
    assert not (tmp_path / "data" / "models").exists()


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("tests:\n  - test: t\n    steps:\n      - bot: Hi\n", 4,
     "'bot:' expects something of an input, but no input (user, press, event, answer, wait,"
     " agent) comes before it"),
    ("tests:\n  - test: t\n    steps:\n      - user: hi\n      - bot: {regex: '('}\n", 5,
     "bad regex '(': missing ), unterminated subpattern at position 0"),
    ("tests:\n  - test: t\n    steps:\n      - wait: soon\n", 4,
     "wait 'soon' is not a duration like 90s, 15m, 1h or 1h30m"),
    ("tests:\n  - test: t\n    steps: [{user: a}]\n  - test: t\n    steps: [{user: b}]\n", 4,
     "test 't' is already defined on line 2"),
    ("tests:\n  - test: t\n    stepz: []\n", 3,
     "unknown key 'stepz' (expected one of: test, steps, services, clock, agents)"),
    ("tests:\n  - test: t\n    steps:\n      - user: hi\n        bot: Hi\n", 4,
     "a step has exactly one of user, press, event, answer, wait, agent, bot, silent, "
     "classified, workflow, state, slots, events (got user, bot)"),
    ("tests:\n  - test: t\n    steps:\n      - user: hi\n      - silent: false\n", 5,
     "'silent:' takes true (the input gets no reply)"),
    ("tests:\n  - test: t\n    steps:\n      - user: [hi\n", 5,
     "invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ("tests: []\n", 1, "'tests:' must be a non-empty list of tests"),
    ("tests:\n  - test: t\n    services:\n      shop.orders: silnet\n    steps: [{user: a}]\n",
     4, "service 'shop.orders': an answer is a mapping (the service's JSON reply), silent or "
     "no_responders"),
    ("tests:\n  - test: t\n    agents: yes\n    steps: [{user: a}]\n", 3,
     "agents 'yes' is not one of: present, absent"),
    ("tests:\n  - test: t\n    steps:\n      - user: hi\n      - agent: arrives\n", 5,
     "agent 'arrives' is not one of: joins, leaves"),
])
def test_each_kind_of_broken_file_names_its_line(text: str, line: int, problem: str) -> None:
    """Every problem in a test file is reported with the line it is on."""
    with pytest.raises(TestFileError) as caught:
        parse_test_file(text, "t.yaml")
    assert str(caught.value) == f"t.yaml:{line}: {problem}"


def test_values_compare_as_written() -> None:
    """User text, slot values and durations keep what the file says: `yes` and `no` are
    text, `19:30` and `01234` are not numbers, a date is not a date object."""
    parsed = parse_test_file(
        "tests:\n  - test: t\n    steps:\n      - user: no\n      - user: 19:30\n"
        "      - slots: {time: 19:30, order_id: 01234, day: 2030-01-02, size: 4}\n"
        "      - wait: 1h30m\n", "t.yaml")
    turns = parsed.tests[0].turns
    assert [t.input.value for t in turns] == ["no", "19:30", 5400.0]
    slots = turns[1].expect[0].value
    assert slots["time"].matches("19:30") and slots["order_id"].matches("01234")
    assert slots["day"].matches("2030-01-02") and slots["size"].matches(4)
    assert not slots["size"].matches(5)


def test_the_tutorial_test_passes_with_the_tutorial_workflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/workflows.md's part 3 tests the feedback workflow of part 1: both as the
    page shows them, the tests fail without the workflow and pass with it."""
    doc = (ROOT / "docs" / "workflows.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```", doc, flags=re.M | re.S)
    workflow = next(b for b in blocks if b.startswith("name: feedback\n"))
    tests = next(b for b in blocks if b.startswith("tests:\n  - test: a happy guest"))
    (tmp_path / "feedback.yaml").write_text(workflow)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "feedback.yaml").write_text(tests)
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["test", str(tmp_path / "tests"), *data]) == 1
    assert "3 failed in" in capsys.readouterr().out
    status = main(["test", str(tmp_path / "tests"), "--workflows",
                   str(tmp_path / "feedback.yaml"), *data])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "3 passed in" in out
