"""The llama.cpp peer harness against a stand-in llama-server (a small Python HTTP server with the
same routes), so the harness is tested without building llama.cpp."""

from __future__ import annotations

import json
import shutil
import stat
import sys

from click.testing import CliRunner

from specdecode.bench.llamacpp_peer import Answer, main, server_args, summarize
from specdecode.demo import demo_dir

FAKE = '''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
spec = args[args.index("--spec-type") + 1] if "--spec-type" in args else "none"
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        tokens = [(sum(prompt) + i) % 50 for i in range(body["n_predict"])]
        if spec == "ngram-simple" and len(prompt) % 2:
            tokens[-1] += 1  # differs on some prompts
        drafted = 0 if spec == "none" else 8
        out = {"tokens": tokens, "timings": {"predicted_per_second": 100.0, "draft_n": drafted,
                                            "draft_n_accepted": drafted // 2}}
        data = json.dumps(out).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def test_server_args_per_speculation_type():
    base = server_args("llama-server", "m.gguf", "none", threads=2, parallel=1, draft_max=4,
                       draft_gguf=None, context=512)
    assert "--spec-type" not in base and base[:3] == ["llama-server", "-m", "m.gguf"]
    ngram = server_args("llama-server", "m.gguf", "ngram-mod", threads=2, parallel=3,
                        draft_max=4, draft_gguf=None, context=512)
    assert ngram[ngram.index("--spec-type") + 1] == "ngram-mod"
    assert ngram[ngram.index("-np") + 1] == "3"
    draft = server_args("llama-server", "m.gguf", "draft", threads=2, parallel=1, draft_max=5,
                        draft_gguf="d.gguf", context=512)
    assert draft[draft.index("-md") + 1] == "d.gguf"
    assert draft[draft.index("--spec-type") + 1] == "draft-simple"
    # one output per slot in its draft context: at least draft_max + 1 slots, same context each
    assert draft[draft.index("-np") + 1] == "6" and draft[draft.index("-c") + 1] == "3072"
    flight = server_args("llama-server", "m.gguf", "draft", threads=2, parallel=3, draft_max=4,
                         draft_gguf="d.gguf", context=1536)
    assert flight[flight.index("-np") + 1] == "15" and flight[flight.index("-c") + 1] == "7680"


def test_summarize_speed_acceptance_agreement():
    base = [Answer(1, [1, 2], 1.0), Answer(2, [3, 4], 2.0)]
    fast = [Answer(1, [1, 2], 0.5, draft_n=4, draft_n_accepted=3), Answer(2, [3, 5], 1.0,
                                                                          draft_n=4)]
    out = summarize(fast, base, {1: [1, 2], 2: [3, 4]})
    assert out["speedup"] == 2.0 and out["acceptance_rate"] == 0.375
    assert out["same_as_own_vanilla"] == 1 and out["same_as_specdecode_vanilla"] == 1


def test_harness_against_a_stand_in_server(tmp_path):
    script = tmp_path / "llama-server"
    script.write_text(f"#!{sys.executable}\n" + FAKE)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    source = tmp_path / "source"  # a model source with the demo tokenizer
    shutil.copytree(demo_dir() / "tokenizer", source)
    shutil.copy(demo_dir() / "target" / "config.json", source)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "--server", str(script), "--gguf", "unused.gguf", "--target", str(source),
        "--spec-types", "ngram-simple", "--limit-per-category", "1", "--max-new-tokens", "6",
        "--in-flight", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = report["one_at_a_time"]
    assert set(rows) == {"none", "ngram-simple"} and report["questions"] == 13
    assert rows["none"]["same_as_own_vanilla"] == 13 and rows["none"]["acceptance_rate"] is None
    assert 0 < rows["ngram-simple"]["same_as_own_vanilla"] < 13
    assert rows["ngram-simple"]["acceptance_rate"] == 0.5
    assert report["in_flight"]["none"]["tokens_per_s"] > 0
