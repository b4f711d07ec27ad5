"""Embeddings of an encoder base over HTTP: OpenAI's /v1/embeddings (through the official `openai` client) and TEI's
/embed. A BitFit embedding task (`FEATURE_EXTRACTION`, no head) serves beside classification tasks on one base, each
text embedded with its task's deltas and pooled as the checkpoint's sentence-transformers config says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra")
openai = pytest.importorskip("openai", reason="the test extra: pip install openai")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from serving_helpers import save_adapter, save_base, text  # noqa: E402
from test_server import running  # noqa: E402

from bitfit_peft import BitFitConfig  # noqa: E402
from bitfit_peft.serving import TaskStore  # noqa: E402
from bitfit_peft.serving.pooling import Pooling  # noqa: E402
from bitfit_peft.serving.server import ServeSettings, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def sentence_transformers_files(base: Path, normalize: bool) -> None:
    """What a sentence-transformers checkpoint records: mean pooling, and (optionally) a Normalize module."""
    (base / "1_Pooling").mkdir(exist_ok=True)
    (base / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (base / "modules.json").write_text(json.dumps(modules))


def save_embedding_adapter(base: Path, out: Path, seed: int) -> Path:
    """A BitFit embedding task: random deltas on the bare encoder, no head (as contrastive training leaves it)."""
    torch.manual_seed(seed)
    model = get_peft_model(transformers.AutoModel.from_pretrained(base), BitFitConfig(task_type="FEATURE_EXTRACTION", init_weights=False))  # fmt: skip
    model.save_pretrained(str(out))
    return out


def offline_embedding(base: Path, adapter: Path | None, sentence: str) -> list[float]:
    """The reference: the encoder with the adapter alone (`PeftModel`), masked mean, L2-normalised."""
    tok = transformers.AutoTokenizer.from_pretrained(base)
    encoder = transformers.AutoModel.from_pretrained(base).eval()
    model = PeftModel.from_pretrained(encoder, str(adapter)).eval() if adapter else encoder
    batch = tok(sentence, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    return Pooling("mean", normalize=True)(states, batch["attention_mask"])[0].tolist()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embed")
    base = save_base(root / "base")
    sentence_transformers_files(base, normalize=True)
    save_adapter(base, root / "adapters" / "sent", num_labels=2, seed=1)
    save_embedding_adapter(base, root / "adapters" / "emb", seed=2)
    return base, root / "adapters"


def test_openai_embeddings_and_tei_embed_equal_the_adapter_alone_beside_a_classifier(
    served: tuple[Path, Path],
) -> None:
    base, adapters = served
    store = TaskStore.open(str(base), str(adapters), max_length=24)
    assert store.refused == {} and store.pooling == Pooling("mean", normalize=True)
    sentences = [text(i) for i in range(5)]
    with running(create_app(ServeSettings(base=str(base), adapters=str(adapters), max_length=24), store)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        got = client.embeddings.create(model="emb", input=sentences)
        assert [d.index for d in got.data] == list(range(5)) and got.model == "emb"
        for d, s in zip(got.data, sentences, strict=True):
            assert d.embedding == pytest.approx(offline_embedding(base, adapters / "emb", s), abs=1e-5)
        assert got.usage.prompt_tokens == sum(len(store.tokenizer(s)["input_ids"]) for s in sentences)
        plain = client.embeddings.create(model=str(base), input=sentences[0]).data[0].embedding  # the base's name
        assert plain == pytest.approx(offline_embedding(base, None, sentences[0]), abs=1e-5)
        assert plain != pytest.approx(got.data[0].embedding, abs=1e-3)  # the task's deltas change the embedding
        with pytest.raises(openai.NotFoundError) as missing:
            client.embeddings.create(model="nope", input="w1")
        assert "Unknown task 'nope'" in missing.value.body["message"]  # OpenAI's error shape
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="emb", input="   ")
        import httpx

        # TEI's /embed, mixed in one batch with predictions of a classification task on the same base
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/embed", json={"inputs": sentences[:2], "model": "emb"})
            assert r.status_code == 200 and r.json()[1] == pytest.approx(got.data[1].embedding, abs=1e-5)
            r = http.post("/v1/predict", json={"task": "sent", "inputs": sentences[0]})
            assert r.status_code == 200 and r.json()["label"] in ("LABEL_0", "LABEL_1")
            r = http.post("/v1/predict", json={"task": "emb", "inputs": sentences[0]})
            assert r.status_code == 400 and "embedding task" in r.json()["error"]
            r = http.post("/embed", json={"inputs": text(9, n=40)})
            assert r.status_code == 413 and "--max-length 24" in r.json()["error"]


def test_pooling_follows_the_checkpoint(tmp_path: Path) -> None:
    base = save_base(tmp_path / "base")
    assert Pooling.from_checkpoint(str(base)) == Pooling("mean", normalize=False)  # no sentence-transformers files
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert Pooling.from_checkpoint(str(base)) == Pooling("cls", normalize=False)
    sentence_transformers_files(base, normalize=True)
    assert Pooling.from_checkpoint(str(base)) == Pooling("mean", normalize=True)
    states, mask = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]]), torch.tensor([[1, 1, 0]])
    assert Pooling("mean")(states, mask).tolist() == [[2.0, 4.0]]
    assert Pooling("max")(states, mask).tolist() == [[3.0, 6.0]]
    assert Pooling("cls")(states, mask).tolist() == [[1.0, 2.0]]
    assert Pooling("mean_sqrt_len")(states, mask)[0].tolist() == pytest.approx([4 / 2**0.5, 8 / 2**0.5])
    with pytest.raises(ValueError, match="Invalid pooling mode 'sum'"):
        Pooling("sum")
