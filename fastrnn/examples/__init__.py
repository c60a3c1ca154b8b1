"""Runnable examples, one for each shape of recurrent model; each makes its own data.

    python -m fastrnn.examples.classify    many-to-one: sentiment of sentences with negation
    python -m fastrnn.examples.tag         many-to-many: token classes of Python source
    python -m fastrnn.examples.translate   encoder-decoder: written dates to ISO dates

One-to-many is the character model's sampling (``fastrnn train``, ``fastrnn.charlm.sample``).
Each takes --steps, --seed and --backend, shows its progress and prints, last, one line
``NAME: METRIC VALUE``. Each module's ``main(argv)`` returns that value too.
"""
