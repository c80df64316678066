"""`python -m lookahead.serve --model ...`: the server without the `lookahead` entry point (bench-serve uses it)."""

import argparse
import sys

from lookahead.serve import app

parser = argparse.ArgumentParser(prog="python -m lookahead.serve", description="OpenAI-compatible lookahead server")
app.add_arguments(parser)
sys.exit(app.run(parser.parse_args()))
