"""Fetch one image the way a careful crawler does, and tell img2dataset why a fetch failed.

img2dataset's own fetch reads a response whole, follows any redirect urllib allows, retries at
once whatever the error and hands every byte string to OpenCV. Ours, used in its place:
- follows redirects to http(s) only (and file:// only where the config allows it);
- reads at most `max_bytes` (a larger image is refused, Content-Length or not);
- honours X-Robots-Tag directives (noai... by default) as img2dataset does;
- retries only what can succeed later (timeouts, 429, 5xx, dropped connections), waiting what
  a 429/503's Retry-After asks when that is at most `max_retry_after` seconds;
- checks the bytes with PIL before OpenCV decodes them: the header's pixel count against
  `max_pixels` (a decompression bomb never gets decoded), then a cheap full read (JPEG at 1/8
  scale, PNG chunk CRCs) so truncated and corrupt files are caught here, not in training.

Every failure is reported as one reason code (`REASONS`); img2dataset counts them per shard in
`*_stats.json` and writes them per URL in its shard parquet, which the filter report carries on.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

# reason code -> what it means; also the order the filter report documents them in
REASONS = {
    "unsupported_scheme": "not an http(s) URL (ftp://, data:...; file:// unless download.allow_file_urls)",
    "http_4xx": "the server refused (404, 403, 410...; the code is in the reason, e.g. http_404)",
    "http_429": "rate-limited, and Retry-After asked for longer than max_retry_after or retries ran out",
    "http_5xx": "server error (e.g. http_500), still failing after the retries",
    "timeout": "no answer within the timeout, after the retries",
    "connection_error": "refused, reset or unresolvable, after the retries",
    "redirect_loop": "redirected in a loop or too many times",
    "redirect_scheme": "redirected to a scheme other than http(s)",
    "disallowed_by_robots": "X-Robots-Tag forbids the use (noai, noimageai...)",
    "too_large": "more bytes than max_image_bytes",
    "truncated_response": "the connection closed before Content-Length bytes arrived",
    "not_an_image": "the bytes are no image format PIL knows (an HTML page, say)",
    "empty_image": "a zero-byte file",
    "unreadable_image": "the file could not be read (permissions, an I/O error)",
    "missing_caption": "an image with no caption (no sidecar .txt/.json, no row in the captions file)",
    "missing_image": "a caption (sidecar file, row, annotation) whose image is not there",
    "outside_source": "a symlink that leads out of the source folder",
    "unknown_file": "a file in a source folder that is neither an image nor a caption",
    "unreadable_name": "a file in a source folder whose name is not UTF-8, which no item id can hold (rename it)",
    "damaged_shard": "a webdataset .tar that cannot be read past this point",
    "decompression_bomb": "more pixels than max_image_pixels",
    "truncated_image": "the image file ends early",
    "corrupt_image": "the image file is damaged",
    "resize_failed": "OpenCV could not decode or resize it",
    "image_too_small": "img2dataset's min_image_size",
    "aspect_ratio_too_large": "img2dataset's max_aspect_ratio",
}
# img2dataset's own resizer messages, as reason codes
RESIZER_MESSAGES = {
    "image too small": "image_too_small",
    "aspect ratio too large": "aspect_ratio_too_large",
    "image area too large": "decompression_bomb",
}
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
USER_AGENT = "Mozilla/5.0 (compatible; dalle-pipeline; +img2dataset)"


def reason_code(message: str | None) -> str:
    """The reason code of an img2dataset error message (ours are codes already)."""
    if message is None:
        return "ok"
    if message in RESIZER_MESSAGES:
        return RESIZER_MESSAGES[message]
    if message.startswith("http_") or message in REASONS:
        return message
    if "X-Robots-Tag" in message:
        return "disallowed_by_robots"
    return "resize_failed" if "decod" in message.lower() else "other"


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float
    retries: int
    max_bytes: int
    max_pixels: int
    max_retry_after: float
    allow_file_urls: bool


class _Refused(Exception):
    """A fetch that failed for a reason code; `retry` says whether trying again can help."""

    def __init__(self, reason: str, retry: bool = False, wait: float = 0.0) -> None:
        super().__init__(reason)
        self.reason, self.retry, self.wait = reason, retry, wait


class _SchemeCheckingRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, schemes: tuple[str, ...]) -> None:
        self.schemes = schemes

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if not newurl.lower().startswith(self.schemes):
            raise _Refused("redirect_scheme")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(
    url: str, policy: FetchPolicy, user_agent_token: str | None = None, disallowed_directives: frozenset[str] = frozenset()
) -> tuple[bytes | None, str | None]:
    """(image bytes, None) or (None, reason code), after at most `policy.retries` retries."""
    schemes = ("http://", "https://", "file://") if policy.allow_file_urls else ("http://", "https://")
    if not url.lower().startswith(schemes):
        return None, "unsupported_scheme"
    opener = urllib.request.build_opener(_SchemeCheckingRedirects(schemes))
    agent = USER_AGENT + (f" {user_agent_token}" if user_agent_token else "")
    request = urllib.request.Request(url, headers={"User-Agent": agent})
    for attempt in range(policy.retries + 1):
        try:
            data = _fetch_once(opener, request, policy, user_agent_token, disallowed_directives)
            problem = damaged_image_reason(data, policy.max_pixels)
            return (data, None) if problem is None else (None, problem)
        except _Refused as refused:
            if not refused.retry or attempt == policy.retries:
                return None, refused.reason
            time.sleep(refused.wait)
    raise AssertionError("unreachable")  # the last attempt always returns


def _fetch_once(opener: urllib.request.OpenerDirector, request: urllib.request.Request, policy: FetchPolicy,
                user_agent_token: str | None, disallowed_directives: frozenset[str]) -> bytes:
    try:
        with opener.open(request, timeout=policy.timeout) as response:
            if disallowed_directives and _disallowed(response.headers, user_agent_token, disallowed_directives):
                raise _Refused("disallowed_by_robots")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise _Refused("too_large")
            data = response.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                raise _Refused("too_large")
            if declared and declared.isdigit() and len(data) < int(declared):
                raise _Refused("truncated_response", retry=True)
            return data
    except urllib.error.HTTPError as err:
        if 300 <= err.code < 400:  # urllib gives up on loops, and refuses redirects to file: itself
            raise _Refused("redirect_scheme" if "is not allowed" in str(err.msg) else "redirect_loop") from None
        if err.code in RETRY_STATUS:
            wait = _retry_after(err.headers.get("Retry-After")) if err.code in (429, 503) else 0.0
            reason = "http_429" if err.code == 429 else f"http_{err.code}"
            raise _Refused(reason, retry=wait <= policy.max_retry_after, wait=wait) from None
        raise _Refused(f"http_{err.code}") from None
    except http.client.IncompleteRead:
        raise _Refused("truncated_response", retry=True) from None
    except (TimeoutError, socket.timeout):
        raise _Refused("timeout", retry=True) from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise _Refused("timeout", retry=True) from None
        raise _Refused("connection_error", retry=True) from None
    except (ConnectionError, http.client.HTTPException, OSError):
        raise _Refused("connection_error", retry=True) from None


def _retry_after(value: str | None) -> float:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); 1 s if absent."""
    if not value:
        return 1.0
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 1.0


def _disallowed(headers: Any, user_agent_token: str | None, directives: frozenset[str]) -> bool:
    """X-Robots-Tag as img2dataset reads it: `noai`, or `<token>: noai` for our user agent token."""
    for value in headers.get_all("X-Robots-Tag") or []:
        token, _, rules = value.rpartition(":") if ":" in value else ("", "", value)
        if token and token.strip().lower() != (user_agent_token or "").lower():
            continue
        if any(rule.strip().lower() in directives for rule in rules.split(",")):
            return True
    return False


def damaged_image_reason(data: bytes, max_pixels: int) -> str | None:
    """A reason code if `data` is no usable image, else None; never decodes a bomb."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.width * image.height > max_pixels:
                return "decompression_bomb"
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            elif image.format == "PNG":
                image.verify()  # every chunk's CRC, through IEND
            else:
                image.load()
    except Image.DecompressionBombError:
        return "decompression_bomb"
    except UnidentifiedImageError:  # PIL opens no damaged header either: a known signature says which it is
        return "corrupt_image" if data.startswith(IMAGE_SIGNATURES) else "not_an_image"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        return "truncated_image" if "truncated" in str(err).lower() or isinstance(err, EOFError) else "corrupt_image"
    return None


# the first bytes of the image formats PIL reads: a file that starts so but does not open is damaged
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                    b"RIFF")
