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


def test_accuracy_is_high_for_a_model_that_draws_the_digit_and_low_for_one_that_does_not(monkeypatch):
    """A stand-in pipeline that returns real test images: of the asked digit (mean accuracy ≥ 0.9; measured 0.98) or of
    the next one (≤ 0.1)."""
    _, _, x, y = digits.split()
    clf, shift = digits.classifier(), {"by": 0}

    def drawn(pipe, prompt, negative, n, *rest):
        d = next(d for d in range(10) if prompt == digits.caption(d))
        return [digits.to_pil(img) for img in x[y == (d + shift["by"]) % 10][:n]]

    monkeypatch.setattr(digits, "generate", drawn)
    assert sum(digits.accuracy(None, d, n=16, clf=clf) for d in range(10)) / 10 >= 0.9
    shift["by"] = 1
    assert sum(digits.accuracy(None, d, n=16, clf=clf) for d in range(10)) / 10 <= 0.1


def test_build_writes_a_loadable_pipeline_that_an_untrained_build_fails_to_draw_with(tmp_path):
    dest = digits.build(tmp_path / "digits", steps=2, vae_steps=2)
    pipe = load_pipeline(str(dest))
    assert (dest / "samples.png").exists() and (dest / "loss.png").exists()
    # 2 steps is untrained: it draws noise the classifier reads as about chance (measured mean 0.1), far below the
    # ≥ 0.9 of a model that draws the digit (the test above)
    clf = digits.classifier()
    assert sum(digits.accuracy(pipe, d, n=8, steps=2, clf=clf) for d in range(10)) / 10 <= 0.3
