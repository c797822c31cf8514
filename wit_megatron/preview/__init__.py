"""`wit-inspect`: what each token is trained with, before a GPU week is spent on it.

    wit-inspect --data-path PREFIX --sample 0 1 --lambda-prompt 0.2 --lambda-response 0.8 [--html OUT.html]

view.py takes samples (or single records) from the training's own dataset class, WITDataset, and
lines up each target with its role and weight; summary.py counts roles and weights per dataset and
names the records a template bug shows in (no response, or one role throughout); render.py writes
them for a terminal (ANSI colours, plain markers when not a TTY), as TSV, and as a self-contained
HTML page; cli.py is the command line.
"""
