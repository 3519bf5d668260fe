"""The README's "Write your own drafter" block, run as written: a plugin module that registers a
drafter is seen by the library, the CLI, the benchmark and the server with no other edit."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import tiny_model, vanilla
from starlette.testclient import TestClient

import specdecode as sd
from specdecode.bench.methods import Settings, check_specs, run_method
from specdecode.cli import main
from specdecode.drafters.options import count
from specdecode.drafters.registry import REGISTRY, self_contained
from specdecode.policies import POLICIES
from specdecode.server.app import create_app

README = Path(__file__).resolve().parents[1] / "README.md"
MODULE = "readme_echo_drafter"


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("#### Write your own drafter"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    where = tmp_path_factory.mktemp("plugin")
    (where / f"{MODULE}.py").write_text(readme_block(), encoding="utf-8")
    sys.path.insert(0, str(where))
    assert "echo" not in REGISTRY
    yield MODULE
    sys.path.remove(str(where))
    REGISTRY.pop("echo", None)
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def demo():
    return sd.load_demo()


def test_cli_loads_the_plugin_and_generates(plugin, demo):
    """First, so the CLI's --plugin is what registers it."""
    result = CliRunner().invoke(main, ["--plugin", plugin, "generate", "--drafter", "echo",
                                       "-o", "num_draft_tokens=3", "--prompt", "one two one two",
                                       "--max-new-tokens", "8", "--compare", "--json",
                                       "--policy", "fixed"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["drafter"] == "echo" and report["identical_to_vanilla"]
    bad = CliRunner().invoke(main, ["--plugin", plugin, "generate", "--drafter", "echo", "-o",
                                    "num_draft_tokens=9", "--prompt", "hi"])
    assert bad.exit_code != 0 and "echo option num_draft_tokens = 9 is out of range: at most 8" \
        in bad.output
    listing = CliRunner().invoke(main, ["--plugin", plugin, "drafters"])
    assert "echo  (needs: nothing)" in listing.output and "num_draft_tokens: int in [1, 8 | nodes]" \
        in listing.output
    missing = CliRunner().invoke(main, ["--plugin", "no_such_plugin_module", "drafters"])
    assert missing.exit_code != 0 and "no_such_plugin_module" in missing.output


def test_library_greedy_equals_vanilla(plugin):
    sd.load_plugins([plugin])
    model = tiny_model("llama")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    out = sd.generate(model, prompt, drafter="echo", num_draft_tokens=3, max_new_tokens=24,
                      eos_token_id=[])
    assert out.token_ids == vanilla(model, prompt, 24) and out.stats.drafted > 0
    with pytest.raises(sd.SpecDecodeError, match="echo option num_draft_tokens = 9 .* at most 8"):
        sd.generate(model, prompt, drafter="echo", num_draft_tokens=9)
    with pytest.raises(sd.SpecDecodeError, match="has no option"):
        sd.generate(model, prompt, drafter="echo", window=2)


def test_benchmark_method_string(plugin):
    sd.load_plugins([plugin])
    model = tiny_model("llama")
    settings = Settings(target=model, draft=None, max_new_tokens=12, num_draft_tokens=4)
    check_specs(["vanilla", "echo:num_draft_tokens=3"], has_draft=False)
    with pytest.raises(sd.SpecDecodeError, match="at most 8"):
        check_specs(["vanilla", "echo:num_draft_tokens=9"], has_draft=False)
    prompt = [9, 10, 11, 9, 10, 11, 9]
    base = run_method("vanilla", settings, prompt, None)
    ours = run_method("echo:num_draft_tokens=3", settings, prompt, base.token_ids)
    assert ours.token_ids == base.token_ids and ours.drafted is not None


@pytest.mark.e2e  # about 5 s: the server app end to end
def test_server_request_names_it_and_bounds_hold(plugin, demo):
    sd.load_plugins([plugin])
    assert "echo" in self_contained()  # needs nothing: requests may pick it by default
    with TestClient(create_app(demo.target, demo.tokenizer)) as client:
        ok = client.post("/v1/completions", json={
            "prompt": "one two one two", "max_tokens": 6, "temperature": 0,
            "speculative": {"drafter": "echo", "num_draft_tokens": 3}})
        assert ok.status_code == 200, ok.text
        bad = client.post("/v1/completions", json={
            "prompt": "hi", "max_tokens": 4, "speculative": {"drafter": "echo",
                                                             "num_draft_tokens": 9}})
        assert bad.status_code == 400
        assert "echo option num_draft_tokens = 9 is out of range: at most 8" in bad.text


class FirstTokens:
    """A policy drafting at most ``depth`` tokens a step."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def plan(self, max_nodes: int, max_depth: int) -> sd.Budget:
        return sd.Budget(min(max_nodes, self.depth), min(max_depth, self.depth))

    def select(self, draft: sd.Draft) -> sd.Draft:
        return draft

    def observe(self, record: sd.StepRecord) -> None:
        pass


@pytest.fixture
def first_tokens_policy():
    @sd.register_policy("first-tokens", options={"depth": count(1, "nodes")})
    def build_first_tokens(build, depth: int = 2) -> FirstTokens:
        return FirstTokens(depth)

    yield "first-tokens"
    POLICIES.pop("first-tokens", None)


def test_a_registered_policy_is_accepted_by_every_entry_point(first_tokens_policy, demo):
    model = tiny_model("llama")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    out = sd.generate(model, prompt, policy=first_tokens_policy, policy_options={"depth": 1},
                      max_new_tokens=12, eos_token_id=[])
    assert out.token_ids == vanilla(model, prompt, 12) and max(out.accept_lengths) <= 2
    with pytest.raises(sd.SpecDecodeError, match="policy first-tokens option depth = 0 is out of"):
        sd.generate(model, prompt, policy=first_tokens_policy, policy_options={"depth": 0})
    ok = CliRunner().invoke(main, ["generate", "--policy", first_tokens_policy, "--prompt", "hi",
                                   "--max-new-tokens", "4", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["policy"] == first_tokens_policy
    bad = CliRunner().invoke(main, ["generate", "--policy", "nope", "--prompt", "hi"])
    assert bad.exit_code != 0 and "unknown policy 'nope'; available:" in bad.output
    assert first_tokens_policy in bad.output
    client = TestClient(create_app(demo.target, demo.tokenizer))
    refused = client.post("/v1/completions", json={"prompt": "hi", "speculative": {
        "policy": "nope"}})
    assert refused.status_code == 400 and first_tokens_policy in refused.text
