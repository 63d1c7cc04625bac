"""Does an S3 endpoint answer? One cheap request, no retries: the controllers ask again at their next pass.

Local mode's runner and the operator ask before each pass of the round state machine, which pauses
the job while its storage does not answer (fedtune.rounds.outage). Any HTTP answer below 500 counts
(S3 says 403 to an anonymous request); a refused or timed-out connection, or a 5xx (a proxy or load
balancer in front of a dead store), does not. No credentials are sent, and no query string.
"""

from __future__ import annotations

import urllib3

PROBE_SECONDS = 2.0  # a store that takes longer to answer a HEAD is as good as gone for a round
_HTTP = urllib3.PoolManager(retries=False, num_pools=16)


def endpoint_url(endpoint: str | None, region: str) -> str:
    """The URL a bucket is reached at: its endpoint, or AWS's regional one when it names none."""
    return endpoint or f"https://s3.{region}.amazonaws.com"


def unavailable(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when the S3 endpoint answers; else why it does not, in a few words."""
    try:
        resp = _HTTP.request("HEAD", endpoint.rstrip("/") + "/", timeout=urllib3.Timeout(total=timeout))
    except urllib3.exceptions.NewConnectionError:  # before TimeoutError: urllib3 2 derives it from that
        return "connection refused"
    except urllib3.exceptions.TimeoutError:
        return f"no answer within {timeout:g}s"
    except urllib3.exceptions.HTTPError as exc:
        return f"no answer ({type(exc).__name__})"
    if resp.status >= 500:
        return f"it answers HTTP {resp.status}"
    return None
