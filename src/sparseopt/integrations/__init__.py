"""Framework integrations: one callback adds sparse training to a Hugging Face Trainer or a Lightning Trainer.

Each lives in its own module and imports its framework only there, so ``import sparseopt`` needs only torch:

    from sparseopt.integrations.transformers import SparseTrainingCallback   # pip install 'sparseopt[transformers]'
    from sparseopt.integrations.lightning import SparseTrainingCallback      # pip install 'sparseopt[lightning]'
"""
