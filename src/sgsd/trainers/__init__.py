"""Trainers: SGSD, GRPO and OPSD on one harness (TRL's GRPOTrainer through `sgsd.trl_adapter`).

`sgsd.trainers.run.train(config)` builds everything from a `RunConfig` and trains.
"""
