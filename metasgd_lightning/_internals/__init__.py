"""Other libraries' private APIs, each use behind one named function, one module per library.

Where a library has no public way to do what we need, the private name is used here and nowhere else;
``tests/test_third_party_internals.py`` has a test per function that fails loudly when the library
changes the name it relies on. Fix the function then, not the test.

- :mod:`.torch_internals`; :mod:`.lightning_internals`; :mod:`.argparse_internals`.
"""
