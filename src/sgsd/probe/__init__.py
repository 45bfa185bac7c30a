"""`sgsd skills probe`: before a training run, do the K teachers of one rollout give SGSD a signal?

- `sgsd.probe.run`: the inputs checked, rollouts sampled (or read), scored by the core path
  (`sgsd.teacher_scoring.probe_teachers`), summarised and written;
- `sgsd.probe.statistics`: pure summaries (quadrants, support quantiles, net polarity per item, the
  between-item permutation test);
- `sgsd.probe.report`: probe.json, teachers.jsonl, report.md with a verdict in plain words, the plots.
"""
