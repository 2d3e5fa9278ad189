"""The in-process test tier (a package: its modules and conftest get their own names, ``unit.*``, beside the
end-to-end tests' ``conftest`` and ``test_*`` modules of the same base names)."""
