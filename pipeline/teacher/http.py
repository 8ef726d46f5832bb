"""The HTTP clients under the teacher client: openai's async client, all of them sharing one TLS context."""

from __future__ import annotations

import functools
import ssl
import sys

import openai


@functools.cache
def tls_context() -> ssl.SSLContext | bool:
    """One TLS context for every HTTP client of the process, made as the openai client's HTTP library makes its
    default (CA bundle, SSL_CERT_FILE/DIR): each client would otherwise load the CA bundle again (~20 ms of CPU),
    and an endpoint has a client per `POOL_CONNECTIONS` requests in flight, a stage one per endpoint."""
    library = sys.modules[openai.DefaultAsyncHttpxClient.__mro__[1].__module__.partition(".")[0]]
    make = getattr(library, "create_ssl_context", None)
    return make() if make is not None else True


def openai_client(base_url: str, api_key: str, timeout_s: float) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client that retries nothing itself (the teacher client does) on the shared TLS context."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s,
                              http_client=openai.DefaultAsyncHttpxClient(verify=tls_context()))
