"""Cold-start bank building against a local chat-completions server on 127.0.0.1 and the tiny model."""

from __future__ import annotations

import json
import re

import pytest

from fake_llm_server import fake_llm_server

from sgsd.cli import main
from sgsd.data import Problem
from sgsd.errors import UserError
from sgsd.skills.bank import load_bank
from sgsd.skills.build import BuildConfig, build_bank
from sgsd.skills.extraction import MISTAKES, SKILLS, parse_reply
from sgsd.skills.llm import HFClient, LLMError, OpenAIClient
from sgsd.skills.merge import MergeConfig, hierarchical_merge

# --- a canned but realistic chat-completions server -----------------------------------------------

SKILL_REPLY = r"""<think>
The solver used {the key idea}: write $\frac{a}{b}$ and compare. A draft: {"general_skills": []}
</think>
The solution worked because it set $x = \frac{{1}}{2}$ early. Skills:
```json
{"general_skills": [
  {"title": "Normalise fractions \\frac{a}{b}", "principle": "Rewrite every ratio as $\\frac{p}{q}$ with $\\gcd(p, q) = 1$ before comparing; a brace } inside a string is fine.", "when_to_apply": "Ratios or rational expressions appear."},
  {"title": "Check the boxed form", "principle": "Put exactly one final answer in \\boxed{...}.", "when_to_apply": "Always, at the end."}
]}
```
Hope this helps {really}."""

MISTAKE_REPLY = r"""<think>They forgot the carry in $\sum_{i=1}^{n} a_i$.</think>
{"common_mistakes": [{"description": "Dropping a carry when adding $\\overline{ab} + \\overline{cd}$", "why_it_happens": "Column sums above 9 are written without the carry.", "how_to_avoid": "Write each carry above the next column {explicitly}."}, {"description": "missing why"}]}"""

TRUNCATED_REPLY = '{"common_mistakes": [{"description": "Sign error", "why_it_happens": "rushing", "how_to_a'


def _fake_reply(prompt: str) -> str:
    if prompt.startswith("Problem: "):  # a student attempt: correct for even numbers, wrong for odd ones
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
        return f"Adding gives \\boxed{{{a + b if a % 2 == 0 else a + b + 1}}}."
    if "SUCCESSFUL solution" in prompt:
        return SKILL_REPLY
    if "FAILED attempt" in prompt:
        return TRUNCATED_REPLY if "What is 13 +" in prompt else MISTAKE_REPLY
    if "Merge them into a smaller set" in prompt:
        items = [json.loads(line.split("] ", 1)[1]) for line in prompt.splitlines() if re.match(r"\[\d+\] \{", line)]
        key = "general_skills" if "general skills" in prompt.split("\n", 1)[0] else "common_mistakes"
        # Keep every other item, renamed: the group shrinks to ceil(n / 2) distinct items.
        kept = [{k: f"{v} (merged)" if i else v for i, (k, v) in enumerate(item.items())} for item in items[::2]]
        return f"<think>Group of {len(items)}.</think>" + json.dumps({key: kept})
    return "I cannot help with that."


@pytest.fixture()
def server():
    with fake_llm_server(_fake_reply) as httpd:
        yield httpd


def _client(server, **kw):
    return OpenAIClient(f"http://127.0.0.1:{server.server_address[1]}", "fake-qwen", retries=1, backoff_s=0.01, **kw)


PROBLEMS = [Problem(f"p{a}", f"What is {a} + {a + 3}?", str(2 * a + 3)) for a in range(10, 22)]
CONFIG = BuildConfig(batch_size=5, merge=MergeConfig(group_size=4, batch_size=3))


# --- parsing ---------------------------------------------------------------------------------------

def test_parser_survives_latex_braces_think_blocks_and_prose():
    parsed = parse_reply(SKILL_REPLY, SKILLS)
    assert parsed.failure is None and len(parsed.items) == 2
    assert parsed.items[0]["title"] == "Normalise fractions \\frac{a}{b}"
    assert "a brace } inside a string" in parsed.items[0]["principle"]
    mistakes = parse_reply(MISTAKE_REPLY, MISTAKES)
    assert len(mistakes.items) == 1 and mistakes.dropped_items == 1
    assert parse_reply(TRUNCATED_REPLY, MISTAKES).failure == "no_json"
    assert parse_reply('{"general_skills": []}', SKILLS).failure == "no_items"
    assert len(parse_reply(SKILL_REPLY, SKILLS, max_items=1).items) == 1


# --- the build, end to end -------------------------------------------------------------------------

def test_build_end_to_end_writes_a_valid_bank_with_statistics(server, tmp_path):
    report = build_bank(PROBLEMS, _client(server), _client(server), tmp_path, CONFIG)
    # Even first operands (10, 12, ..., 20) are answered correctly: 6 successes, 6 failures.
    assert (report.memories, report.successes, report.failures) == (12, 6, 6)
    assert report.parse_failures == 1  # the truncated reply for "What is 13 + 16?"
    assert report.dropped_items == 5  # one item without fields in each of the 5 parsed mistake replies
    assert (report.candidate_skills, report.candidate_mistakes) == (12, 5)
    bank = load_bank(tmp_path / "skill_bank.json")
    # Exact duplicates: the 6 successes produce the same 2 skills, so 12 candidates dedup to 2.
    assert [s.skill_id for s in bank.general_skills] == ["gen_001"]
    assert [m.mistake_id for m in bank.common_mistakes] == ["err_001"]
    layers = bank.metadata["general_merge_layers"]
    assert [(x["input_items"], x["num_groups"], x["output_items"], x["stopped_reason"]) for x in layers] == [
        (2, 1, 1, "root_group_reached")]
    raw = load_bank(tmp_path / "raw_candidates.json")
    assert raw.general_skills[0].skill_id == "gen_cand_000001" and raw.metadata["parse_failures"] == 1
    failed = [json.loads(x) for x in (tmp_path / "extractions.jsonl").read_text().splitlines()
              if json.loads(x)["failure"]]
    assert len(failed) == 1 and failed[0]["reply"] == TRUNCATED_REPLY


def test_merge_layers_shrink_until_the_root_group_and_count_stagnation():
    class Halving:
        name = "halving"

        def complete(self, prompts, *, max_tokens, temperature):
            return [_fake_reply(p) for p in prompts]

    contents = [{"title": f"t{i}", "principle": f"p{i}", "when_to_apply": "w"} for i in range(20)]
    items, layers = hierarchical_merge(SKILLS, contents, Halving(), MergeConfig(group_size=4))
    # 20 -> groups of 4 -> 5 groups x 2 = 10 -> 3 groups (2+2+1) = 5 -> 2 groups (2+1) = 3 -> 1 group -> 2
    assert [(x.input_items, x.num_groups, x.output_items) for x in layers] == [(20, 5, 10), (10, 3, 5), (5, 2, 3), (3, 1, 2)]
    assert layers[-1].stopped_reason == "root_group_reached" and len(items) == 2

    class Unhelpful:
        name = "unhelpful"

        def complete(self, prompts, *, max_tokens, temperature):
            return ["no idea"] * len(prompts)

    items, layers = hierarchical_merge(SKILLS, contents, Unhelpful(), MergeConfig(group_size=4, patience=3))
    assert [x.stagnant_layers for x in layers] == [1, 2, 3] and layers[-1].stopped_reason == "stagnation_patience_reached"
    assert items == contents and all(x.parse_failures == 5 for x in layers)


def test_each_stage_resumes_from_its_file(server, tmp_path):
    reference = build_bank(PROBLEMS, _client(server), _client(server), tmp_path / "full", CONFIG)
    calls_full = len(server.requests)

    class Crashing:
        """Dies after `limit` calls, like a preempted job."""

        def __init__(self, inner, limit):
            self.inner, self.limit, self.name = inner, limit, inner.name

        def complete(self, prompts, **kw):
            if self.limit == 0:
                raise KeyboardInterrupt
            self.limit -= 1
            return self.inner.complete(prompts, **kw)

    out = tmp_path / "resumed"
    for limit in (1, 2, 1):  # crash in stage 1, then in stage 2, then in the merge
        server.requests.clear()
        with pytest.raises(KeyboardInterrupt):
            build_bank(PROBLEMS, Crashing(_client(server), limit), Crashing(_client(server), limit), out, CONFIG)
    # A torn last line, as a crash during a write leaves it, is dropped and redone.
    with open(out / "extractions.jsonl", "a") as handle:
        handle.write('{"memory_id": "p2')
    server.requests.clear()
    resumed = build_bank(PROBLEMS, _client(server), _client(server), out, CONFIG)
    assert resumed.bank.to_json()["general_skills"] == reference.bank.to_json()["general_skills"]
    assert resumed.bank.common_mistakes == reference.bank.common_mistakes
    assert len(server.requests) < calls_full
    server.requests.clear()
    build_bank(PROBLEMS, _client(server), _client(server), out, CONFIG)
    assert server.requests == []  # everything done: a rerun calls nothing


def test_http_client_retries_server_errors_and_reports_failures_in_one_line(server):
    server.fail_next = 1
    assert _client(server).complete(["What else?"], max_tokens=5, temperature=0.0) == ["I cannot help with that."]
    assert len(server.requests) == 2 and server.requests[0]["max_tokens"] == 5
    server.fail_next = 5
    with pytest.raises(LLMError, match="HTTP 503.*after 2 attempts"):
        _client(server).complete(["x"], max_tokens=5, temperature=0.0)
    client = OpenAIClient(f"http://127.0.0.1:{server.server_address[1]}/nowhere", "m", retries=0)
    with pytest.raises(LLMError, match="HTTP 404"):
        client.complete(["x"], max_tokens=5, temperature=0.0)
    assert isinstance(LLMError("x"), UserError)


def test_tiny_model_as_policy_and_as_updater(tiny_model, tiny_tokenizer, server, tmp_path):
    tiny = HFClient(tiny_model, tiny_tokenizer, name="tiny", batch_size=4)
    config = BuildConfig(attempt_max_tokens=8, extract_max_tokens=8, batch_size=4, merge=MergeConfig(group_size=4))
    report = build_bank(PROBLEMS[:4], tiny, _client(server), tmp_path / "a", config)
    # An untrained 8-token attempt never contains a correct box: all four are failures.
    assert (report.memories, report.failures) == (4, 4)
    memories = [json.loads(x) for x in (tmp_path / "a" / "memories.jsonl").read_text().splitlines()]
    assert all(m["correct"] is False and m["failure"] for m in memories)
    tiny_model.train()
    report = build_bank(PROBLEMS[:4], _client(server), tiny, tmp_path / "b", config)
    assert report.parse_failures == 4 and len(report.bank.general_skills) == 0  # noise is counted, not parsed
    assert tiny_model.training  # the updater restored the trainer's mode


def test_cli_build_runs_against_the_local_server(server, tmp_path, capsys):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in PROBLEMS[:6]))
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    argv = ["skills", "build", "--problems", str(problems), "--output-dir", str(tmp_path / "out"),
            "--policy-url", url, "--policy-model", "fake-qwen", "--group-size", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "6 memories (3 correct, 3 wrong)" in out and "skill_bank.json" in out
    assert main(["skills", "validate", "--bank", str(tmp_path / "out" / "skill_bank.json")]) == 0
    assert len(server.requests) == 6 + 6 + 2  # attempts, extractions, one merge call per list
