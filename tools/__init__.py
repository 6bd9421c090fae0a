"""Repository tools (generators, checks); importable by the tests."""
