"""Evaluating a checkpoint on tokenized datasets (``python -m megatron_ualm.evaluate``).

Modules, in the order data flows through them:

* ``run``            options, checks, the per-task loop; returns the results document
* ``teacher_forced`` loss and accuracy per task, with the trainer's rows, batches and sums
* ``references``     an example -> its prompt (context up to the last answer) and reference
* ``generation``     greedy answers from the inference engine, scored per task
* ``text_scores``    WER / CER, SQuAD exact match and token F1 (pure)
* ``clap``           CLAP text-audio cosine of text-to-audio answers (local model only)
* ``report``         the one-screen table and the JSON file
"""
