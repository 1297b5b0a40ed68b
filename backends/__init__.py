"""Backend adapters: ``bn1d.backends.numpy`` (the specification), ``.jax`` and ``.torch``.

Each adapter imports only its own framework, when it is imported itself.
"""
