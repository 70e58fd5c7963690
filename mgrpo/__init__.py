"""M-GRPO: momentum-anchored, label-free GRPO, memory-efficient on one node (arXiv 2512.13070).

The flow, and where each part lives:

    config.py            typed settings (YAML + dotted overrides)          errors.py   MgrpoError, the one base
    build.py             a run's parts from the config, in memory order: data, engine, policy, KL reference,
                         momentum model, optimizer (the one place that picks implementations)
    loop/trainer.py      the training loop: owns the order of events
    loop/stages.py       its stages, each taking what it uses: rollout, score, assign_rewards, reference,
                         policy_gradients, optimizer_step, momentum_update, validate
    algorithm.py         the math as small pure functions (IQR filter, vote, rewards, advantages, losses, EMA)
    models/              what the stages run: loading, the token scorer (fused head), micro-batch layouts,
                         momentum storages, optimizers, Liger
    engines/             rollout engines: transformers, vLLM, synthetic (no model)
    data/                problems and prompts; the embedded default's task and shipped base model
    evaluation/          avg@k / maj@k / pass@k, the harness, benchmarks and checkpoint sweeps
    storage/             run directories (one writer, disk space) and checkpoints (data, never code)
    metrics.py           per-step metrics, stage times, the collapse monitor, plots
    plan.py              memory per part and phase, before anything loads
    comparison.py        SRT against M-GRPO over seeds
    commands/            the command line: train, eval, compare, plan, plot
"""
