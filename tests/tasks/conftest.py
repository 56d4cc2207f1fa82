import pytest

import helpers


@pytest.fixture(scope="session")
def bert_tokenizer():
    """bert-base-uncased's fast tokenizer, as BLIP checkpoints use it."""
    return helpers.blip_processor(32).tokenizer
