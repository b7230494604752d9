import json
import shutil

import pytest
import torch

from ssrengine import IGNORE_INDEX
from ssrengine.cli import main as cli_main
from ssrengine.core.io import read_rows
from ssrengine.core.rundir import EVAL as EVAL_DIR
from ssrengine.core.rundir import GenerationRow, VerdictRow
from ssrengine.data.records import Example, encode, load_examples
from ssrengine.evaluation.evaluate import resolve_target
from ssrengine.evaluation.metrics import confusion_matrix, task_metrics, unanswerable_prf
from ssrengine.evaluation.retention import (
    MC_FILE,
    answer_token_sequences,
    asset_path,
    chat_sequences,
    load_mc,
    load_probe,
    mc_accuracy,
    mc_sequences,
    probe_correct,
    run_lm_eval,
    score_sequences,
)
from ssrengine.models.loading import load_model, load_tokenizer
from tests.tiny import records, write_jsonl

REFUSAL = "The documents do not say."


def ex(i, response, answerable):
    return Example(
        id=f"e{i}", messages=[{"role": "user", "content": "q?"}], response=response,
        answerable=answerable,
    )  # fmt: skip


# ---------------------------------------------------------------------- task metrics
def test_confusion_and_unanswerable_prf_hand_computed():
    # gold:     A  A  A  A  A  U  U  U
    # declined: n  n  n  y  n  y  y  n
    unans = [False] * 5 + [True] * 3
    declined = [False, False, False, True, False, True, True, False]
    m = confusion_matrix(unans, declined)
    assert m == [[4, 1], [1, 2]]
    prf = unanswerable_prf(m).to_json()
    # TP=2 (U declined), FP=1 (A declined), FN=1 (U answered), TN=4
    assert prf["precision"] == pytest.approx(2 / 3)
    assert prf["recall"] == pytest.approx(2 / 3)
    assert prf["f1"] == pytest.approx(2 / 3)
    assert prf["accuracy"] == pytest.approx(6 / 8)
    assert prf["support"] == 3


def test_prf_degenerate_cases():
    assert unanswerable_prf([[3, 0], [0, 0]]).to_json() == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0, "support": 0,
    }  # fmt: skip
    never_declines = unanswerable_prf([[2, 0], [2, 0]]).to_json()
    assert never_declines["recall"] == 0.0 and never_declines["f1"] == 0.0
    always_declines = unanswerable_prf([[0, 2], [0, 2]]).to_json()
    assert always_declines["precision"] == 0.5 and always_declines["recall"] == 1.0
    assert always_declines["f1"] == pytest.approx(2 * 0.5 / 1.5)


def test_task_metrics_hand_computed():
    examples = [
        ex(0, "Founded in 1987.", True),
        ex(1, "Mara Quill.", True),
        ex(2, "In Oslo.", True),
        ex(3, REFUSAL, False),
        ex(4, REFUSAL, False),
        ex(5, REFUSAL, None),  # unlabeled: the gold answer declines, so it is unanswerable
    ]
    answers = {
        "e0": "The company was founded in 1987.",  # recall 3/3, F1 2*(3/5*1)/(3/5+1) = 0.75
        "e1": "Mara.",  # recall 1/2, precision 1, F1 2/3
        "e2": "The documents do not say where it is.",  # declines an answerable one: 0, 0
        "e3": "I don't know, the documents do not mention it.",  # correct decline
        "e4": "It was founded in 1990.",  # answers an unanswerable one
        "e5": "This is not mentioned in the documents.",  # correct decline
    }
    metrics, details = task_metrics(examples, answers)
    m = metrics.to_json()
    assert m["confusion"]["matrix"] == [[2, 1], [1, 2]]
    assert m["n"] == 6 and m["n_answerable"] == 3
    assert m["answer_recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["answer_f1"] == pytest.approx((0.75 + 2 / 3 + 0) / 3)
    assert m["unanswerable"]["precision"] == pytest.approx(2 / 3)
    assert m["unanswerable"]["recall"] == pytest.approx(2 / 3)
    assert m["score"] == pytest.approx(100 * (2 / 3 + 0.5) / 2)
    by_id = {d.id: d.to_json() for d in details}
    assert by_id["e2"]["declined"] and by_id["e2"]["recall"] == 0.0
    assert "recall" not in by_id["e3"]


# ------------------------------------------------------------------ probe assets
def test_shipped_probe_and_mc_sets_are_valid():
    probe = load_probe()
    assert len(probe) >= 50 and len({p.id for p in probe}) == len(probe)
    assert all(p.accept and probe_correct(p.reference, p.accept) for p in probe)
    assert {p.category for p in probe} >= {"knowledge", "arithmetic", "language", "instruction"}
    mc = load_mc()
    assert len(mc) >= 50 and len({m.id for m in mc}) == len(mc)
    assert all(len(m.choices) == 4 and len(set(m.choices)) == 4 for m in mc)
    # answers are spread over positions, so a position bias cannot score well
    positions = [m.answer for m in mc]
    assert max(positions.count(k) for k in range(4)) < 0.4 * len(mc)


def test_probe_correct_uses_any_alias_with_all_tokens():
    assert probe_correct("The capital of France is Paris.", ["Paris"])
    assert probe_correct("It has seven days.", ["7", "seven"])
    assert probe_correct("He was George Washington.", ["George Washington"])
    assert not probe_correct("It was Washington Irving.", ["George Washington"])
    assert not probe_correct("Lyon.", ["Paris"])


# ------------------------------------------------------------------------ scoring
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))


def _plain_logprobs(model, ids, labels):
    """Reference: one unpacked forward with full logits, fp64 log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    total, n = 0.0, 0
    for t in range(len(ids) - 1):
        if labels[t + 1] != IGNORE_INDEX:
            total += float(lp[t, labels[t + 1]])
            n += 1
    return total, n


def test_packed_scores_equal_unpacked_forward(tiny):
    model, tok = tiny
    recs = records(7)
    prompts = [r["messages"] for r in recs]
    answers = [r["response"] * (1 + i % 3) for i, r in enumerate(recs)]
    seqs = chat_sequences(tok, prompts, answers)
    assert seqs[0] == encode(tok, prompts[0], answers[0])
    # a small budget forces several packed rows of several sequences each
    budget = 2 * max(len(s[0]) for s in seqs)
    got = score_sequences(model, seqs, max_tokens=budget)
    for (ids, labels), (lp, n) in zip(seqs, got):
        ref_lp, ref_n = _plain_logprobs(model, ids, labels)
        assert n == ref_n
        assert lp == pytest.approx(ref_lp, abs=1e-3, rel=1e-4)


def test_own_answers_are_scored_on_their_exact_generated_tokens(tiny):
    from ssrengine.core.config import GenerationConfig, ModelConfig
    from ssrengine.data.records import encode_prompt
    from ssrengine.generation import Request, SamplingParams
    from ssrengine.generation.hf import HFGenerator

    model, tok = tiny
    gen = HFGenerator(
        ModelConfig(path="tiny"), GenerationConfig(batch_size=2), hf_model=model, tokenizer=tok
    )
    msgs = [[{"role": "user", "content": q}] for q in ("What is the capital?", "Who? ")]
    outs = gen.generate([Request(messages=m) for m in msgs], SamplingParams(max_new_tokens=5))
    seqs = answer_token_sequences(tok, msgs, [o.token_ids for o in outs])
    for m, o, (ids, labels) in zip(msgs, outs, seqs):
        p = encode_prompt(tok, m)
        assert ids == p + o.token_ids
        assert [x for x in labels if x != IGNORE_INDEX] == o.token_ids
    # greedy tokens are the argmax at every step: each one's log-prob is the row maximum
    for (ids, _), (lp, n) in zip(seqs, score_sequences(model, seqs)):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        k = len(ids) - n
        assert lp == pytest.approx(float(logp[k - 1 : len(ids) - 1].max(-1).values.sum()), abs=1e-3)


def test_mc_accuracy_matches_plain_argmax(tiny):
    model, tok = tiny
    items = load_mc(limit=12)
    acc = norm = 0
    for it in items:
        lls = [_plain_logprobs(model, ids, lab)[0] for ids, lab in mc_sequences(tok, it)]
        acc += max(range(4), key=lls.__getitem__) == it.answer
        norm += max(range(4), key=lambda j: lls[j] / len(it.choices[j])) == it.answer
    res = mc_accuracy(model, tok, items)
    assert res["acc"] == pytest.approx(acc / len(items))
    assert res["acc_norm"] == pytest.approx(norm / len(items))


def test_lm_eval_local_task_matches_builtin_scorer(tiny, tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    model, tok = tiny
    src = [json.loads(x) for x in asset_path(MC_FILE).read_text().splitlines()][:20]
    f = write_jsonl(tmp_path / "mc20.jsonl", src)
    res = run_lm_eval(str(tiny_model_dir), local_files=[f], batch_size=4)
    ours = mc_accuracy(model, tok, load_mc(f))
    assert set(res) == {"local_mc20"}
    assert res["local_mc20"]["acc"] == pytest.approx(ours["acc"])
    assert res["local_mc20"]["acc_norm"] == pytest.approx(ours["acc_norm"])


# ------------------------------------------------------------------- eval command
EVAL_ARGS = ["--limit", "6", "--probe-limit", "4", "--mc-limit", "3", "--lm-eval", "off"]
FAST = ["--generation.max_new_tokens=6", "--generation.batch_size=4"]


def test_eval_base_model_writes_json_and_resumes(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", records(9))
    out = tmp_path / "base"
    argv = ["eval", str(tiny_model_dir), "--out", str(out), "--split", f"in_domain={data}"]
    assert cli_main(argv + EVAL_ARGS + FAST) == 0
    res = json.loads((out / EVAL_DIR / "eval.json").read_text())
    assert res["mode"] == "base" and res["kind"] == "model"
    split = res["splits"]["in_domain"]
    assert split["n"] == 6 and sum(map(sum, split["confusion"]["matrix"])) == 6
    # --limit is class-balanced: records(9) has 3 unanswerable and 6 answerable
    assert split["n_answerable"] == 3
    paper = split["paper"]
    assert {"answerable_acc", "unanswerable_acc", "answer_recall", "decision_auc"} <= set(paper)
    assert all(v["lo"] <= v["value"] <= v["hi"] for v in paper.values())
    assert res["retention"]["probe"]["ci"]["lo"] <= res["retention"]["probe"]["accuracy"]
    assert res["retention"]["mc"]["n"] == 3 and "ci" in res["retention"]["mc"]
    assert len(read_rows(out / EVAL_DIR / "mc_details.jsonl")) == 3
    # the base scored against its own answers: no drift
    own = res["retention"]["own_answers"]
    assert own["drift_per_token"] == 0.0
    assert set(res["retention_metrics"]) == {"probe_acc", "mc_acc", "own_answer_prob"}
    assert len(read_rows(out / EVAL_DIR / "in_domain.jsonl")) == 6
    details = read_rows(out / EVAL_DIR / "in_domain_details.jsonl")
    ids = [d["id"] for d in details]
    assert ids == sorted(ids) and len(set(ids)) == 6  # file order, no repeats
    assert all(d["refusal_logprob"] < 0 for d in details)
    # a rerun generates nothing new (rows keyed by id + model + prompt)
    assert cli_main(argv + EVAL_ARGS + FAST) == 0
    assert len(read_rows(out / EVAL_DIR / "in_domain.jsonl")) == 6
    assert len(read_rows(out / EVAL_DIR / "probe_base.jsonl")) == 4


def _fake_run(run, tiny_model_dir, train_file, *, perturb: bool):
    """A run dir as the pipeline leaves it: config.json, a checkpoint, generations, verdicts."""
    from ssrengine.core.config_load import load_config

    cfg = load_config(
        None,
        [
            f"--model.path={tiny_model_dir}",
            f"--data.train_file={train_file}",
            f"--run.dir={run}",
            "--run.mode=ssr",
        ],
    )
    run.mkdir(parents=True)
    cfg.save(run / "config.json")
    ckpt = run / "checkpoints" / "step-3"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3}))
    if perturb:  # a "fine-tuned" model: the same architecture, shifted weights
        model = load_model(str(ckpt), device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(ckpt)
    exs = load_examples(train_file)
    write_jsonl(
        run / "generations.jsonl",
        [GenerationRow(e.id, "In Oslo.", [], "stop", "hf", "m", "h").to_json() for e in exs],
    )
    write_jsonl(
        run / "verdicts.jsonl",
        [VerdictRow(e.id, i % 2 == 0, 1.0, "", "j", "h").to_json() for i, e in enumerate(exs)],
    )


def test_eval_run_dir_uses_checkpoint_base_drift_and_figure1(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", records(5))
    test = write_jsonl(tmp_path / "test.jsonl", records(6))
    run = tmp_path / "run"
    torch.manual_seed(0)
    _fake_run(run, tiny_model_dir, train, perturb=True)
    t = resolve_target(str(run))
    assert t.kind == "run" and t.mode == "ssr" and t.model.endswith("step-3")
    assert t.base == str(tiny_model_dir) and t.out == run
    # an earlier eval of the base: its probe answers are reused, not regenerated
    base = tmp_path / "base"
    assert cli_main(["eval", str(tiny_model_dir), "--out", str(base), "--split", f"x={test}"]
                    + EVAL_ARGS + FAST) == 0  # fmt: skip
    seeded = [
        {**r, "response": f"seeded {i}"}
        for i, r in enumerate(read_rows(base / EVAL_DIR / "probe_base.jsonl"))
    ]
    write_jsonl(base / EVAL_DIR / "probe_base.jsonl", seeded)
    argv = ["eval", str(run), "--split", f"in_domain={test}", "--split", f"ood={test}"]
    assert cli_main(argv + EVAL_ARGS + FAST + ["--base-eval", str(base)]) == 0
    res = json.loads((run / EVAL_DIR / "eval.json").read_text())
    assert set(res["splits"]) == {"in_domain", "ood"}
    own = res["retention"]["own_answers"]
    assert own["drift_per_token"] != 0.0
    assert own["drift_per_token"] == pytest.approx(
        own["logprob_per_token"] - own["base_logprob_per_token"]
    )
    # base answers come from the base model, the run's own probe answers from the checkpoint
    base_rows, ft_rows = (
        read_rows(run / EVAL_DIR / f) for f in ("probe_base.jsonl", "probe.jsonl")
    )
    assert {r["model"] for r in base_rows} == {str(tiny_model_dir)}
    assert {r["model"] for r in ft_rows} == {t.model}
    assert [r["response"] for r in base_rows] == [f"seeded {i}" for i in range(4)]
    details = read_rows(run / EVAL_DIR / "probe_details.jsonl")
    assert [d["base_answer"] for d in details] == [f"seeded {i}" for i in range(4)]
    fig1 = json.loads((run / EVAL_DIR / "self_vs_gold.json").read_text())
    assert [r["accept"] for r in fig1["rows"]] == [True, False, True, False, True]
    assert all(r["gold_logprob"] < 0 and r["own_logprob"] < 0 for r in fig1["rows"])


def test_eval_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {}, "run": {}}))
    assert cli_main(["eval", str(run)]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_retention_metrics_count_the_shipped_mc_set_once():
    from ssrengine.evaluation.metrics import retention_metrics
    from ssrengine.evaluation.retention import MC_TASK

    ret = {
        "probe": {"accuracy": 0.5},
        "mc": {"acc": 0.4},
        "own_answers": {"prob_per_token": 0.7},
        "lm_eval": {MC_TASK: {"acc": 0.4}, "hellaswag": {"acc": 0.3, "acc_norm": 0.35}},
    }
    assert retention_metrics(ret) == {
        "probe_acc": 0.5,
        "mc_acc": 0.4,
        "own_answer_prob": 0.7,
        "lm_eval:hellaswag/acc": 0.3,
        "lm_eval:hellaswag/acc_norm": 0.35,
    }
    assert retention_metrics({**ret, "lm_eval": {"skipped": "not installed"}}) == {
        "probe_acc": 0.5, "mc_acc": 0.4, "own_answer_prob": 0.7,
    }  # fmt: skip


def test_task_metrics_and_judge_share_the_gold_class():
    """An answerable example whose gold text reads as a refusal is answerable in both."""
    from ssrengine.rehearsal.judge import gold_declines

    hedged = ex(0, "The documents do not mention the fee, but the deadline is 5 May.", True)
    metrics, (d,) = task_metrics([hedged], {"e0": "The deadline is 5 May."})
    assert d.unanswerable is gold_declines(hedged) is False
    assert metrics.n_answerable == 1 and d.recall > 0


def test_limit_bounds_every_part_of_eval(tiny_model_dir, tmp_path):
    """--limit alone bounds the splits (balanced, seeded), the probe, the MC set and Figure 1."""
    train = write_jsonl(tmp_path / "train.jsonl", records(12))
    test = write_jsonl(tmp_path / "test.jsonl", records(12))
    run = tmp_path / "run"
    _fake_run(run, tiny_model_dir, train, perturb=False)
    argv = ["eval", str(run), "--split", f"in_domain={test}", "--limit", "4", "--lm-eval", "off"]
    assert cli_main(argv + FAST) == 0
    res = json.loads((run / EVAL_DIR / "eval.json").read_text())
    assert res["splits"]["in_domain"]["n"] == 4
    assert res["splits"]["in_domain"]["n_answerable"] == 2
    assert res["retention"]["probe"]["n"] == 4 and res["retention"]["mc"]["n"] == 4
    fig1 = json.loads((run / EVAL_DIR / "self_vs_gold.json").read_text())
    assert len(fig1["rows"]) == 4 and sum(r["unanswerable"] for r in fig1["rows"]) == 2
    first = [d["id"] for d in read_rows(run / EVAL_DIR / "in_domain_details.jsonl")]
    # the same seed draws the same questions; another seed draws others
    assert cli_main(argv + FAST) == 0
    assert [d["id"] for d in read_rows(run / EVAL_DIR / "in_domain_details.jsonl")] == first
    assert cli_main(argv + FAST + ["--seed", "1"]) == 0
    assert [d["id"] for d in read_rows(run / EVAL_DIR / "in_domain_details.jsonl")] != first


def test_decision_probe_scores_the_refusal_after_the_eval_prompt(tiny, tmp_path):
    from ssrengine.core.config_load import load_config
    from ssrengine.data.records import prompt_messages
    from ssrengine.evaluation.evaluate import Loaded, refusal_scores

    model, tok = tiny
    cfg = load_config(None, [])
    exs = load_examples(write_jsonl(tmp_path / "t.jsonl", records(3)))
    got = refusal_scores(cfg, Loaded(None, model, tok), exs, REFUSAL)
    for e in exs:
        msgs = prompt_messages(e.messages, e.documents, cfg.data.system_prompt)
        ids, labels = encode(tok, msgs, REFUSAL)
        assert got[e.id] == pytest.approx(_plain_logprobs(model, ids, labels)[0], abs=1e-3)
