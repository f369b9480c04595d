"""pytest setup for the conformance suite: keep its output quiet."""


def pytest_configure(config):
    # Importing paddle warns that ccache is missing (a compiler cache for custom ops): noise here.
    config.addinivalue_line("filterwarnings", "ignore:No ccache found:UserWarning")
