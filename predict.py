"""Write a Kaggle submission from a checkpoint, offline:
`python predict.py ckpt_path=RUN/checkpoints/best.ckpt input_path=test.csv output_path=submission.csv`
(the same as `python -m pref_lightning.predict ...` once the package is installed)
"""

from pref_lightning.predict.__main__ import run

if __name__ == "__main__":
    run()
