"""Lists every file through the proxy with the Python SDK 1.1's beta auto-pagination and prints the
ids as JSON. Run by tests/test_ownership.py with the interpreter scripts/ensure-python-sdk-1.1 makes
(`.venv-sdk-1.1`); the proxy key comes from FILES_PROXY_KEY."""

import json
import os
import sys

import anthropic

base_url, limit = sys.argv[1], int(sys.argv[2])
client = anthropic.Anthropic(base_url=base_url, api_key=os.environ["FILES_PROXY_KEY"], max_retries=0)
print(json.dumps([f.id for f in client.beta.files.list(limit=limit)]))
