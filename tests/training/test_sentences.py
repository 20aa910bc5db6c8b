"""Rule-based sentence extraction on phantom reports and hand-written MIMIC-style reports; LLM stub."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from radflash.training.phantoms import generate_phantom
from radflash.training.sentences import (
    ExtractionError,
    LLMExtractor,
    extract_sentences,
    normalise_location,
    parse_llm_reply,
    prompt_for,
)


def test_prompt_form() -> None:
    assert prompt_for("pleural effusion", "right lung") == "There is pleural effusion of the right lung"
    assert prompt_for("cardiomegaly") == "There is cardiomegaly"
    assert prompt_for("Pneumothorax", None, "absent") == "There is no pneumothorax"
    assert prompt_for("atelectasis", "left lower lung", "possible") == "There may be atelectasis of the left lower lung"
    with pytest.raises(ValueError):
        prompt_for("edema", None, "maybe")


# (report, expected sentences in order) — MIMIC-CXR style, written by hand
REAL = [
    ("No pleural effusion or pneumothorax.", ["There is no pleural effusion", "There is no pneumothorax"]),
    ("There is no focal consolidation, pleural effusion, or pneumothorax.",
     ["There is no consolidation", "There is no pleural effusion", "There is no pneumothorax"]),
    ("Heart size is normal. The lungs are clear.", ["There is no cardiomegaly", "There is no consolidation"]),
    ("Patchy opacity in the left lower lobe may represent atelectasis or consolidation.",
     ["There is lung opacity of the left lower lung", "There may be atelectasis of the left lower lung",
      "There may be consolidation of the left lower lung"]),
    ("Small left apical pneumothorax is present.", ["There is pneumothorax of the left upper lung"]),
    ("Moderate right pleural effusion with adjacent atelectasis.",
     ["There is pleural effusion of the right lung", "There is atelectasis of the right lung"]),
    # comparisons keep the finding's state (issue #17): an increased effusion is present
    ("Compared to the prior study, the effusion has increased.", ["There is pleural effusion"]),
    ("Unchanged from prior.", []),
    ("No significant interval change.", []),
    ("Stable small left pleural effusion.", ["There is pleural effusion of the left lung"]),
    ("Bibasilar atelectasis.", ["There is atelectasis of the bilateral lower lungs"]),
    ("Right middle lobe pneumonia cannot be excluded.", ["There may be pneumonia of the right middle lung"]),
    ("Retrocardiac opacity, possibly pneumonia.",
     ["There is lung opacity of the left lower lung", "There may be pneumonia of the left lower lung"]),
    ("Mild pulmonary edema.", ["There is edema"]),
    ("Endotracheal tube terminates 4 cm above the carina.", ["There is support devices"]),
    ("No acute cardiopulmonary process.", ["There is no acute cardiopulmonary abnormality"]),
    ("There is no pneumothorax, but a small right effusion is present.",
     ["There is no pneumothorax", "There is pleural effusion of the right lung"]),
    ("FINDINGS: The cardiomediastinal silhouette is normal. IMPRESSION: A 1.2 cm nodule in the right upper lobe.",
     ["There is no cardiomegaly", "There is lung nodule of the right upper lung"]),
    ("Pneumothorax is not seen.", ["There is no pneumothorax"]),
    ("Findings suggestive of mild cardiomegaly.", ["There may be cardiomegaly"]),
    ("Bilateral pleural effusions, right greater than left.", ["There is pleural effusion of the bilateral lungs"]),
    ("Opacity at the right lung base, likely atelectasis. No pneumothorax.",
     ["There is lung opacity of the right lower lung", "There may be atelectasis of the right lower lung",
      "There is no pneumothorax"]),
]


@pytest.mark.parametrize(("report", "expected"), REAL)
def test_real_style_reports(report: str, expected: list[str]) -> None:
    assert extract_sentences(report) == expected


def test_phantom_reports_agree_with_their_labels() -> None:
    """Positive sentences name exactly the drawn findings at their locations; negatives only absent ones."""
    for seed in range(150):
        ph = generate_phantom(seed, 32)
        sentences = set(extract_sentences(ph.report))
        names = {f.name for f in ph.findings}
        expected = set()
        for f in ph.findings:
            certainty = "possible" if f.hedged else "present"
            if f.name == "pleural effusion" and sum(g.name == f.name for g in ph.findings) == 2 and not any(
                    g.hedged for g in ph.findings if g.name == f.name):
                expected.add(prompt_for(f.name, "bilateral lungs"))
            else:
                expected.add(prompt_for(f.name, f.location, certainty))
        assert expected <= sentences, (seed, ph.report, sentences)
        for s in sentences - expected:
            if s.startswith("There is no "):
                assert not any(s == prompt_for(n, None, "absent") for n in names), (seed, ph.report, s)
            elif any(s == prompt_for(n) for n in names):
                pass  # a comparison restating a drawn finding ("the mass has increased") keeps it present
            else:  # the only other extra positive: the opacity that a hedged finding explains
                assert s.startswith("There is lung opacity of the "), (seed, ph.report, s)
                assert any(f.hedged and s.endswith(f"of the {f.location}") for f in ph.findings)


def test_location_normalisation() -> None:
    assert normalise_location("Right lower lobe") == "right lower lung"
    assert normalise_location("left apex") == "left upper lung"
    assert normalise_location("lingula") == "left middle lung"
    assert normalise_location("right base", "pleural effusion") == "right lung"
    assert normalise_location("somewhere odd") == "somewhere odd"
    assert normalise_location(None) is None


# ---- LLM extractor against a local stub server ---------------------------------------------------
class _Stub(BaseHTTPRequestHandler):
    reply: str = "[]"
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append({"body": json.loads(body), "auth": self.headers.get("Authorization")})
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    handler = type("Handler", (_Stub,), {"reply": "[]", "seen": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_llm_extractor(stub: tuple[str, type[_Stub]]) -> None:
    url, handler = stub
    handler.reply = "```json\n" + json.dumps([
        {"finding": "Pleural effusion", "certainty": "present", "location": "right lower lobe"},
        {"finding": "pneumothorax", "certainty": "absent", "location": None},
        {"finding": "atelectasis", "certainty": "possible", "location": "left base"},
    ]) + "\n```"
    ex = LLMExtractor(url, "some-model", api_key="k", timeout=5)
    assert ex("Moderate right effusion. No pneumothorax. Possible left basilar atelectasis.") == [
        "There is pleural effusion of the right lung", "There is no pneumothorax",
        "There may be atelectasis of the left lower lung"]
    sent = handler.seen[-1]
    assert sent["auth"] == "Bearer k" and sent["body"]["model"] == "some-model"
    assert sent["body"]["messages"][-1]["content"].startswith("Moderate right effusion")


@pytest.mark.parametrize("reply", [
    "Sure! Here are the findings: effusion",
    json.dumps({"result": "ok"}),
    json.dumps([{"finding": "edema", "certainty": "definitely"}]),
    json.dumps([{"finding": "", "certainty": "present"}]),
    json.dumps([{"finding": "edema", "certainty": "present", "location": 3}]),
    json.dumps(["edema"]),
    "__import__('os').system('true')",
])
def test_llm_malformed_replies(stub: tuple[str, type[_Stub]], reply: str) -> None:
    url, handler = stub
    handler.reply = reply
    with pytest.raises(ExtractionError):
        LLMExtractor(url, "m", timeout=5)("No effusion.")


def test_llm_unreachable() -> None:
    with pytest.raises(ExtractionError, match="request failed"):
        LLMExtractor("http://127.0.0.1:9", "m", timeout=2)("No effusion.")


def test_parse_llm_reply_accepts_object_form() -> None:
    got = parse_llm_reply(json.dumps({"findings": [{"finding": "effusions", "certainty": "absent", "location": None}]}))
    assert [m.sentence() for m in got] == ["There is no pleural effusion"]
