"""The embedded digits model: its data, tokenizer, classifier and build path (a few steps; the real build is
bench/digits.py's first run)."""

import numpy as np

from lorakit.sd import digits
from lorakit.sd.pipeline import load_pipeline


def test_captions_are_single_tokens_and_unseen_digits_have_words(tmp_path):
    tok = digits.tokenizer(tmp_path)
    for d in range(10):
        assert len(tok(digits.caption(d), add_special_tokens=False).input_ids) == 4


def test_classifier_reads_the_test_split(tmp_path):
    _, _, x, y = digits.split()
    clf = digits.classifier()
    assert (clf.predict(x.reshape(len(x), -1)) == y).mean() > 0.9
    # and it reads digits that went through the pipeline's image format and back
    back = np.stack([digits.from_pil(digits.to_pil(img)) for img in x[:100]])
    assert (clf.predict(back) == y[:100]).mean() > 0.8


def test_build_writes_a_loadable_pipeline(tmp_path):
    dest = digits.build(tmp_path / "digits", steps=2, vae_steps=2)
    pipe = load_pipeline(str(dest))
    assert (dest / "samples.png").exists() and (dest / "loss.png").exists()
    assert 0.0 <= digits.accuracy(pipe, 3, n=2, steps=2) <= 1.0
