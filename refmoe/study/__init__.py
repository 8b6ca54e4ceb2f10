"""The specialisation study behind ``refmoe reproduce``: does L_o + L_v make experts more specialised than L_aux
alone, without losing the balance? Each module is imported by name (nothing is re-exported here):

    data        synthetic clustered tokens, per-cluster teachers, the narrow domain, the task loss L_h
    optim       Adam / AdamW written out
    metrics     balance and specialisation measures (paper App. E, and two with the known cluster labels)
    alignment   cosines between the per-term gradients; how discriminative p_ij = g_y . x~_ij is
    evaluate    every metric on the held-out sets
    train       one training step, one phase, the loss combinations, RunId (which fine-tuning run)
    runner      the study's knobs (StudyConfig), one seed, then every seed with the summary and the verdicts
    summary     means over seeds, and a verdict per paper claim
    report      the report folder: results.json, report.md and the figures
    figures     the PNG figures
"""
