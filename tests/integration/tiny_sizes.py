"""The smallest sizes at which the tiny world's pipelines still run every stage: shared by the
integration tests (imported as a plain module: pytest puts this directory on sys.path)."""

# the bootstrap SFT's held-out check at its smallest: checked at steps 2, 4 and 6; a 4-step
# teacher never reaches the target, so it also takes the 2 steps past the schedule
CHECK_TINY = [
    "teacher.bootstrap.check.after=2", "teacher.bootstrap.check.every=2",
    "teacher.bootstrap.check.extra_steps=2", "teacher.bootstrap.check.problems=4",
    "teacher.bootstrap.check.samples=2",
]

# teacher bootstrap, base student and their eval (pipeline=bootstrap)
BOOTSTRAP_TINY = [
    "pipeline=bootstrap",
    *CHECK_TINY,
    "teacher.bootstrap.pretrain_steps=4", "teacher.bootstrap.sft_steps=4",
    "teacher.bootstrap.batch_size=8", "teacher.bootstrap.sft_examples=64",
    "pipeline.pretrain.steps=4", "pipeline.pretrain.batch_size=8",
    "pipeline.pretrain_corpus_size=200",
    "pipeline.eval.n_samples=4", "pipeline.eval.n_problems=6", "pipeline.eval.ks=[1,4]",
    "pipeline.eval.max_new_tokens=24", "task.n_test=6",
    "trainer.num_threads=1", "trainer.progress=false",
    # at these sizes a background worker's start-up costs more than its evals; the tests that
    # want it (test_background_evals.py, test_kill_resume.py) turn it back on
    "pipeline.eval.background=false",
]

# the default pipeline (compare): both arms, every table row
COMPARE_TINY = [
    "pipeline=compare",
    *CHECK_TINY,
    "teacher.bootstrap.pretrain_steps=4", "teacher.bootstrap.sft_steps=4",
    "teacher.bootstrap.batch_size=8", "teacher.bootstrap.sft_examples=64",
    "teacher.thinking.max_new_tokens=32", "teacher.non_thinking.max_new_tokens=16",
    "pipeline.pretrain.steps=4", "pipeline.pretrain.batch_size=8",
    "pipeline.pretrain_corpus_size=200",
    "pipeline.eval.n_samples=4", "pipeline.eval.n_problems=4", "pipeline.eval.ks=[1,4]",
    "pipeline.eval.max_new_tokens=24", "task.n_test=4",
    "pipeline.generate.n_prompts=12", "pipeline.generate.batch_size=64",
    "pipeline.off_policy.steps=3", "pipeline.off_policy.batch_size=4",
    "pipeline.on_policy.steps=2", "pipeline.on_policy.batch_size=2",
    "pipeline.on_policy.n_per_prompt=2", "pipeline.on_policy.max_new_tokens=24",
    "pipeline.on_policy.n_prompts=8",
    "pipeline.four_stage.cold_start.n_examples=32", "pipeline.four_stage.cold_start.steps=3",
    "pipeline.four_stage.cold_start.batch_size=8",
    "pipeline.four_stage.reasoning_rl.steps=2", "pipeline.four_stage.reasoning_rl.n_prompts=16",
    "pipeline.four_stage.reasoning_rl.prompts_per_batch=2",
    "pipeline.four_stage.reasoning_rl.group_size=2",
    "pipeline.four_stage.reasoning_rl.max_new_tokens=24",
    "pipeline.four_stage.fusion.n_prompts=8", "pipeline.four_stage.fusion.samples_per_prompt=2",
    "pipeline.four_stage.fusion.n_examples=16", "pipeline.four_stage.fusion.steps=2",
    "pipeline.four_stage.fusion.batch_size=4",
    "pipeline.four_stage.fusion.sampling.max_new_tokens=24",
    "pipeline.four_stage.general_rl.steps=2", "pipeline.four_stage.general_rl.n_prompts=16",
    "pipeline.four_stage.general_rl.prompts_per_batch=2",
    "pipeline.four_stage.general_rl.group_size=2",
    "pipeline.four_stage.general_rl.max_new_tokens=24",
    "trainer.num_threads=1", "trainer.progress=false",
    "pipeline.eval.background=false",  # as above
]
