"""Wharf's runner for Eclipse Paho's interoperability suite (vendored here, see README.md).

Usage: python run.py client_test.py|client_test5.py PORT [Test.test_name ...]

Runs every test of the chosen suite (or the ones named) against localhost:PORT and prints
unittest's report.
client_test.py hands its own options to unittest.main(), which refuses them; here unittest
gets the program name only, so both suites run unchanged.
"""
import os
import runpy
import sys
import unittest

script, port, names = sys.argv[1], sys.argv[2], sys.argv[3:]
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
os.chdir(here)
main = unittest.main
unittest.main = lambda *args, **kwargs: main(argv=[script, *names], exit=True)
# No "-h": both scripts test `o in ("--help")`, a substring test that "-h" passes; the
# suites connect to "localhost".
sys.argv = [script, "-p", port, *names]
runpy.run_path(os.path.join(here, script), run_name="__main__")
