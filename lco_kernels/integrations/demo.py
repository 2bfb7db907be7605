"""A few GRPO steps with LCO on a tiny random model, on CPU, in about a minute (no download).

    python -m lco_kernels.integrations.demo                      # LCOGRPOTrainer, policy_loss="lco"
    python -m lco_kernels.integrations.demo --policy-loss ppo --fused-linear
    python -m lco_kernels.integrations.demo --policy-loss gspo   # TRL's GSPO (importance_sampling_level="sequence")
    python -m lco_kernels.integrations.demo --policy-loss trl --loss-type cispo --compare-stock  # TRL's own formula
    python -m lco_kernels.integrations.demo --compare-stock      # also stock GRPOTrainer: step times side by side

Prints, per optimizer step, the loss, its gradient norm, the mean reward and the loss sweep's statistics
(entropy, mean probability of the sampled token, LCO's target probability and clamped fraction,
logit-gradient norm), and TRL's step time.
Needs the "integrations" extra.
"""
import argparse
import statistics
import tempfile
import time

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from .tiny import prompt_dataset, tiny_model, tiny_tokenizer, toy_reward
from .trl import POLICY_LOSSES, LCOGRPOTrainer

_COLUMNS = ("loss", "grad_norm", "reward", "entropy", "lco/token_prob", "lco/target_prob", "lco/clamped_frac",
            "lco/logit_grad_norm", "step_time")


class _PrintSteps(TrainerCallback):
    """Prints each step's logged metrics; records each optimizer step's CPU time (this process, all
    threads), which a busy shared machine disturbs far less than wall time."""

    def __init__(self):
        self.cpu_times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu_times.append(time.process_time() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            cells = [f"{state.global_step:>4}"] + [f"{logs[c]:>12.4g}" if c in logs else f"{'-':>12}"
                                                   for c in _COLUMNS]
            print(" ".join(cells), flush=True)


def run(trainer_cls, steps, seed, config=None, **trainer_kwargs):
    """Train ``steps`` steps (``config``: more GRPOConfig options); returns (wall, CPU) seconds per step: TRL's
    logged step_time (its training_step: generation, rewards, loss, backward) and the CPU time of the whole
    optimizer step."""
    printer = _PrintSteps()
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                          max_steps=steps, learning_rate=3e-3, logging_steps=1, report_to="none", use_cpu=True,
                          bf16=False, save_strategy="no", seed=seed, disable_tqdm=True, **(config or {}))
        trainer = trainer_cls(model=tiny_model(vocab_size=2048, seed=seed), reward_funcs=toy_reward, args=args,
                              train_dataset=prompt_dataset(n=64, vocab_size=2048),
                              processing_class=tiny_tokenizer(vocab_size=2048), callbacks=[printer],
                              **trainer_kwargs)
        trainer.remove_callback(PrinterCallback)  # its raw dict per step would drown the table
        print(f"{'step':>4} " + " ".join(f"{c:>12}" for c in _COLUMNS))
        trainer.train()
        return [log["step_time"] for log in trainer.state.log_history if "step_time" in log], printer.cpu_times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy-loss", default="lco", choices=POLICY_LOSSES)
    parser.add_argument("--loss-type", default="dapo", help="GRPOConfig's loss_type (both trainers)")
    parser.add_argument("--fused-linear", action="store_true", help="loss from hidden states, without the logits")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-stock", action="store_true",
                        help="first run stock GRPOTrainer (TRL's loss) with the same seed; print both step times")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    times = {}
    # GSPO is TRL's sequence-level importance sampling: the stock trainer with the same config runs it too
    config = {"loss_type": args.loss_type}
    if args.policy_loss == "gspo":
        config["importance_sampling_level"] = "sequence"
    if args.compare_stock:
        print(f"stock trl.GRPOTrainer ({', '.join(f'{k}={v!r}' for k, v in config.items())})")
        times["stock GRPOTrainer"] = run(GRPOTrainer, args.steps, args.seed, config)
    print(f"LCOGRPOTrainer(policy_loss={args.policy_loss!r}, fused_linear={args.fused_linear})")
    times["LCOGRPOTrainer"] = run(LCOGRPOTrainer, args.steps, args.seed, config, policy_loss=args.policy_loss,
                                  fused_linear=args.fused_linear)
    if args.compare_stock:
        # The first step also warms up allocators and caches: the median of the others is the step time.
        for k, kind in enumerate(("wall", "CPU")):
            med = {name: statistics.median(t[k][1:] or t[k]) for name, t in times.items()}
            print(f"median {kind} time per step (steps 2..{args.steps}, generation included): stock "
                  f"{med['stock GRPOTrainer']:.3f} s, LCOGRPOTrainer {med['LCOGRPOTrainer']:.3f} s, ratio "
                  f"{med['LCOGRPOTrainer'] / med['stock GRPOTrainer']:.2f}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
