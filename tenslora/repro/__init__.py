"""Reproduce the TensLoRA / TensLoRA+ claims: seeds, controls, one report (issue 7).

``benchmarks/repro/repro.yaml`` describes the three experiments and the scales (``cpu``: MiniLM on
tweets and DINOv2-small on Fashion-MNIST, sized for about 3 hours on 2 cores; ``paper``: RoBERTa-base
on CoLA/MRPC and ViT-base on EuroSAT/DTD with the paper's settings). This package turns it into one
sweep per task (``tenslora.sweep`` format: every job is a ``tenslora train`` run), runs the sweeps
through the local scheduler (resumable), and writes ``docs/results.md`` from the sweep aggregation
(:func:`tenslora.sweep.report.aggregate`) with a verdict per claim.

* A — constructions at equal parameters: PEFT LoRA r=2 and r=8; every construction x {Tucker, CP}
  with ranks matched to LoRA r=2 (:func:`tenslora.repro.match.match_ranks`).
* B — heterogeneous learning rate: core lambda in {1, 4, 8, 16} and the uniform-lr controls (lambda 1,
  whole-adapter lr x m); LoRA+ ratios for PEFT LoRA.
* C — rank allocation: uniform vs the allocator's choice vs its reverse, at two budgets. The allocation
  needs a probe run (:func:`tenslora.train.probe.allocate`, the rule behind ``--ranks auto``); it runs
  once per task (seed 0) before the sweep and its ranks are written into the sweep as explicit ranks.

Jobs that several experiments share (A's matched Tucker run is B's lambda = 1 and, when the ranks agree,
C's uniform arm) run once: one sweep per task, duplicates removed. Each job's roles (which experiment,
which arm) are stored in ``<dir>/<task>/repro_index.json`` and copied by ``collect``.

Modules, one job each, in the order data flows: ``spec`` (the repro file, tasks, model shapes),
``match`` (ranks matched to a LoRA parameter count), ``plan`` (configurations and roles -> sweep files,
and the committed generated files), ``run`` (the allocation probe, then the sweeps), ``collect``
(finished runs -> ``benchmarks/results``), ``verdicts`` (statistics and one verdict per claim),
``plots`` and ``report`` (``docs/results.md``). This package module imports nothing; import the
sub-modules you need.
"""
