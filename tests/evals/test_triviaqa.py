from slmsearch.data import triviaqa_split


def test_gold_answer_more_likely_than_another_questions_answer(default_model, data_dir):
    from slmsearch.evals.triviaqa import answer_logprobs, fewshot_prefix

    model, tok = default_model
    scored, pool = triviaqa_split(data_dir)
    rows = scored[:50]
    prompts = [fewshot_prefix(pool, 3) + r["context"] for r in rows]
    gold = answer_logprobs(model, tok, prompts, [r["answer"] for r in rows])
    wrong = answer_logprobs(model, tok, prompts, [rows[(i + 7) % 50]["answer"] for i in range(50)])
    wins = sum(g > w for g, w in zip(gold, wrong))
    # 33/50 measured on SmolLM2-135M-Instruct (3-shot); chance is 25/50.
    assert wins >= 30, f"gold beat a wrong answer on only {wins}/50 questions"


def test_fewshot_pool_is_never_scored(data_dir):
    scored, pool = triviaqa_split(data_dir)
    assert len(scored) == 1900 and len(pool) == 100
    assert not {r["context"] for r in scored} & {r["context"] for r in pool}


def test_exact_match_through_lm_eval(default_model, data_dir):
    from slmsearch.evals.triviaqa import exact_match

    model, tok = default_model
    out = exact_match(model, tok, data_dir, limit=8, shots=2, batch_size=8)
    assert out["triviaqa_questions"] == 8
    assert 0.0 <= out["triviaqa_exact_match"] <= 1.0
