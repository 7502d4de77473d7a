"""The four-stage baseline's rules on examples: each rule reward of general RL, the cold start's
filters, the chats of fusion and general RL (the last flag decides), and the fusion mix."""

import pytest

from factory import chat, rl
from factory.config import GeneralRLConfig, TaskConfig
from factory.errors import ConfigError
from factory.stages import four_stage as fs
from factory.tasks import Problem
from factory.tasks.arith import ArithTask, last_integer, make_problem
from factory.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit

THOUGHT = "<think>\n2*3=6\n</think>\n\n6"
EMPTY = "<think>\n\n</think>\n\n6"


@pytest.fixture(scope="module")
def task():
    return ArithTask(TaskConfig(name="arith", kind="arith", n_test=20))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def is_six(answer: str) -> bool:
    return last_integer(answer) == 6


# ----------------------------------------------------------------------------- rule rewards

def test_correct_reward_grades_the_answer_after_the_think_block():
    assert rl.correct_reward(is_six, THOUGHT) == 1.0
    assert rl.correct_reward(is_six, EMPTY) == 1.0
    assert rl.correct_reward(is_six, "<think>\n2*3=6\n</think>\n\n7") == 0.0
    # the 6 inside an unclosed block is thinking, not an answer
    assert rl.correct_reward(is_six, "<think>\n2*3=6") == 0.0


def test_format_reward_wants_a_finished_closed_completion_with_a_parseable_answer():
    assert rl.format_reward(THOUGHT, True, last_integer) == 1.0
    assert rl.format_reward("The answer is 12.", True, last_integer) == 1.0
    assert rl.format_reward(THOUGHT, False, last_integer) == 0.0  # cut by max_new_tokens
    assert rl.format_reward("<think>\n2*3=6", True, last_integer) == 0.0
    assert rl.format_reward("<think>\nx\n</think>\n\nsix", True, last_integer) == 0.0


def test_follow_reward_obeys_the_latest_flag():
    assert rl.follow_reward(THOUGHT, "think") == 1.0
    assert rl.follow_reward(EMPTY, "think") == 0.0
    assert rl.follow_reward(EMPTY, "no_think") == 1.0
    assert rl.follow_reward("6", "no_think") == 1.0
    assert rl.follow_reward(THOUGHT, "no_think") == 0.0


def test_length_reward_against_a_target():
    assert rl.length_reward(10, 20, 0.5) == 1.0
    assert rl.length_reward(20, 20, 0.5) == 1.0
    assert rl.length_reward(25, 20, 0.5) == pytest.approx(0.5)
    assert rl.length_reward(30, 20, 0.5) == 0.0
    assert rl.length_reward(90, 20, 0.5) == 0.0
    assert rl.length_reward(21, 20, 0.0) == 0.0  # tolerance 0: a hard cut
    with pytest.raises(ValueError):
        rl.length_reward(5, 0, 0.5)


def test_weighted_reward():
    parts = {"correct": 1.0, "format": 1.0, "follow": 0.0, "length": 0.5}
    weights = {"correct": 1.0, "format": 0.2, "follow": 0.5, "length": 0.2}
    assert rl.weighted_reward(parts, weights) == pytest.approx(1.3)
    with pytest.raises(KeyError, match="length"):
        rl.weighted_reward({"correct": 1.0}, {"correct": 1.0, "length": 1.0})


def test_general_reward_combines_the_rules_for_a_query(task):
    cfg = GeneralRLConfig(think_target_tokens=40, no_think_target_tokens=8, length_tolerance=0.5)
    reward = fs.general_reward(task, "arith", cfg)
    p = make_problem([2, 3], ["*"])
    think = fs.Query(p, "think", fs.conversation(p, "think"))
    no_think = fs.Query(p, "no_think", fs.conversation(p, "no_think"))
    # correct, formatted, obeys /think, within 40 tokens: 1 + .2 + .5 + .2
    assert reward(think, THOUGHT, 20, True) == pytest.approx(
        {"reward": 1.9, "correct": 1.0, "format": 1.0, "follow": 1.0, "length": 1.0})
    # under /no_think the same thought disobeys the flag, and 10 tokens is 2 over a target of 8
    got = reward(no_think, THOUGHT, 10, True)
    assert got["follow"] == 0.0 and got["length"] == pytest.approx(0.5)
    assert got["reward"] == pytest.approx(1.0 + 0.2 + 0.0 + 0.2 * 0.5)
    assert reward(no_think, EMPTY, 6, False)["format"] == 0.0  # never finished


def test_answer_extractors():
    assert fs.answer_extractor("arith")("so 3098.") == 3098
    assert fs.answer_extractor("math")("the answer is $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    code = fs.answer_extractor("code")
    assert code("```python\ndef f(x):\n    return x\n```") is not None
    assert code("```python\ndef f(x) return\n```") is None
    with pytest.raises(ConfigError):
        fs.answer_extractor("chess")


# ----------------------------------------------------------------------------- cold-start filters

def test_repetition_and_near_duplicate_helpers():
    assert fs.is_repetitive("a=1\nb=2\na=1\na=1", max_repeats=2)
    assert not fs.is_repetitive("a=1\nb=2\na=1", max_repeats=2)
    assert not fs.is_repetitive("", max_repeats=2)
    index = fs.NearDuplicateIndex(["Compute (37+45)*38-18.", "Compute 12*30+7."], n=5)
    assert index.max_similarity("compute  (37+45)*38-18.") == 1.0  # case and spaces normalised
    assert index.max_similarity("Compute (37+45)*38-19.") == pytest.approx(0.8)  # 16 of 20
    assert index.max_similarity("Compute 5*6-9.") < 0.5
    assert index.max_similarity("zzz") == 0.0


def test_filter_cold_start_keeps_clean_traces_and_counts_each_reason(task):
    test_problem = task.problems("test", 1)[0]
    good, other = task.problems("train", 2)
    candidates = [
        fs.Candidate(good, good.reasoning, good.answer),
        fs.Candidate(other, None, other.answer),  # no trace
        fs.Candidate(other, other.reasoning, str(int(other.answer) + 1)),  # wrong answer
        fs.Candidate(other, other.reasoning + "\n1+1=2" * 3, other.answer),  # repetitive
        # the trace ends on another number than the (correct) answer
        fs.Candidate(other, other.reasoning + "\nso 5", other.answer),
        # a test problem with a trailing space: its prompt normalises to the test prompt
        fs.Candidate(test_problem.__class__(id="x", prompt=test_problem.prompt + " ",
                                            answer=test_problem.answer),
                     test_problem.reasoning, test_problem.answer),
    ]
    kept, counts = fs.filter_cold_start(task, candidates, task.problems("test"),
                                        max_line_repeats=2, ngram=5, threshold=0.8)
    assert counts == {"no_trace": 1, "wrong": 1, "repetitive": 1, "mismatch": 1,
                      "near_duplicate": 1, "kept": 1}
    assert kept == [good]


def test_the_generators_traces_pass_every_filter(task):
    problems = task.problems("train", 200)
    candidates = [fs.Candidate(p, p.reasoning, p.answer) for p in problems]
    kept, counts = fs.filter_cold_start(task, candidates, task.problems("test"),
                                        max_line_repeats=2, ngram=5, threshold=0.8)
    assert counts["kept"] == len(kept) >= 190  # verified by construction; a few may repeat a line
    assert counts["wrong"] == counts["mismatch"] == counts["near_duplicate"] == 0


def test_cold_start_from_a_jsonl(tmp_path, task):
    path = tmp_path / "cot.jsonl"
    path.write_text('{"problem": "Compute 2*3.", "reasoning": "2*3=6", "answer": "6"}\n'
                    '{"problem": "Compute 2*4.", "reasoning": "2*4=8", "answer": "9", '
                    '"gold": "8"}\n')
    cfg = fs.OmegaConf.structured(fs_config(source="jsonl", path=str(path), n_examples=10))
    candidates = fs.cold_start_candidates(task, cfg)
    assert [c.problem.answer for c in candidates] == ["6", "8"]
    kept, counts = fs.filter_cold_start(task, candidates, [], max_line_repeats=2, ngram=5,
                                        threshold=0.8)
    assert [p.prompt for p in kept] == ["Compute 2*3."] and counts["wrong"] == 1
    assert "jsonl_sha256" in fs._cold_start_source_inputs(cfg)
    with pytest.raises(ConfigError, match="cold_start.path"):
        fs._cold_start_source_inputs(fs_config(source="jsonl", path=str(tmp_path / "no.jsonl")))


def fs_config(**kw):
    from factory.config import ColdStartConfig

    return ColdStartConfig(**kw)


# ----------------------------------------------------------------------------- chats and the mix

def test_two_turn_chat_flips_the_flag_and_the_last_one_decides(tok):
    first, second = make_problem([2, 3], ["*"]), make_problem([4, 5], ["*"])
    msgs = fs.conversation(second, "no_think", earlier=first)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"].endswith("/think") and msgs[2]["content"].endswith("/no_think")
    text = chat.render(tok, msgs, add_generation_prompt=True, enable_thinking=True)
    assert text.endswith("Compute 4*5. /no_think<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\n6<|im_end|>" in text  # the earlier answer, no think block


def test_fusion_mix_follows_its_ratios_and_renders_both_modes(tok):
    problems = [make_problem([a, 7], ["*"], id=str(a)) for a in range(2, 30)]
    verified = {i: (p.reasoning, p.answer) for i, p in enumerate(problems) if i % 2 == 0}
    examples, counts = fs.fusion_examples(tok, problems, verified, n_examples=400,
                                          think_ratio=0.6, multi_turn_ratio=0.25, max_len=512,
                                          seed=0)
    assert len(examples) == 400 and counts["think"] + counts["no_think"] == 400
    assert 0.5 < counts["think"] / 400 < 0.7 and 0.15 < counts["multi_turn"] / 400 < 0.35
    assert counts["verified_prompts"] == len(verified)
    n_empty = n_thought = 0
    for e in examples:
        target = tok.decode([t for t, lab in zip(e["input_ids"], e["labels"]) if lab != -100])
        prompt = tok.decode([t for t, lab in zip(e["input_ids"], e["labels"]) if lab == -100])
        assert prompt.endswith("<|im_start|>assistant\n")  # the flag alone decides the mode
        last_flag = "no_think" if prompt.rstrip().rsplit("/", 1)[-1].startswith("no_think") \
            else "think"
        assert chat.follows_mode(target, last_flag)
        n_empty += target.startswith("<think>\n\n</think>\n\n")
        n_thought += not target.startswith("<think>\n\n</think>")
    assert n_empty == counts["no_think"] and n_thought == counts["think"]


def test_fusion_without_verified_thinking_data_says_so_and_goes_on(tok, caplog):
    problems = [make_problem([2, 3], ["*"])]
    with caplog.at_level("WARNING"):
        examples, counts = fs.fusion_examples(tok, problems, {}, n_examples=4, think_ratio=0.5,
                                              multi_turn_ratio=0.0, max_len=128, seed=0)
    assert "solved none" in caplog.text
    assert counts == {"think": 0, "no_think": 4, "multi_turn": 0, "verified_prompts": 0}
    examples, counts = fs.fusion_examples(tok, problems, {}, n_examples=4, think_ratio=0.0,
                                          multi_turn_ratio=0.0, max_len=128, seed=0)
    assert counts["no_think"] == 4


def test_rl_pool_skips_the_cold_start_queries(task):
    pool = fs.rl_pool(task, skip=10, n=5)
    assert pool == task.problems("train", 15)[10:]
    assert isinstance(pool[0], Problem)


def test_stage_configs_that_cannot_work_fail_when_the_plan_is_built():
    from factory.config import FusionConfig, GRPOConfig
    from factory.inspect import compose

    cfg = compose(["student=tiny"])

    def grpo(**kw):
        return fs.grpo_stage("x", cfg.student, cfg.task, base="b", cfg=cfg,
                             stage_cfg=fs.OmegaConf.structured(GRPOConfig(**kw)))

    with pytest.raises(ConfigError, match="group_size >= 2"):
        grpo(group_size=1)
    with pytest.raises(ConfigError, match="divide"):
        grpo(prompts_per_batch=3, group_size=3, grad_accum=2)
    with pytest.raises(ConfigError, match="modes"):
        grpo(modes=["thinking"])
    bad_entropy = GRPOConfig()
    bad_entropy.entropy.rule = "linear"
    with pytest.raises(ConfigError, match="entropy control"):
        fs.grpo_stage("x", cfg.student, cfg.task, base="b", cfg=cfg,
                      stage_cfg=fs.OmegaConf.structured(bad_entropy))
    with pytest.raises(ConfigError, match="think_ratio=1.5"):
        fs.fusion_stage("x", cfg.student, cfg.task, base="b", cfg=cfg,
                        stage_cfg=fs.OmegaConf.structured(FusionConfig(think_ratio=1.5)))
    assert grpo().needs == ["b"]
