"""``keystay device ui``: the employee's page, served on 127.0.0.1 only.

Design note
-----------
The page is a small server-rendered site (standard library
:class:`~http.server.ThreadingHTTPServer`, HTML from
:mod:`keystay.client.ui.render`, one stylesheet and one small script shipped
in the package under ``static/``; nothing is fetched from the network). It
reaches the daemon only through :class:`~keystay.client.ui.access.DaemonAccess`.
Every form works without JavaScript; the script only reloads the overview
while it is idle (every ``--refresh`` seconds), so figures stay current.

Who may talk to it
~~~~~~~~~~~~~~~~~~
Any local process and any web page the employee visits can send requests to
a port on 127.0.0.1, so the server trusts nothing but a secret:

1. **Launch link, then session.** At start it draws two secrets with
   ``secrets.token_urlsafe(32)`` (256 bits each): a *launch* token, printed
   and opened as ``http://127.0.0.1:PORT/?token=LAUNCH``, and a *session*
   secret that never appears in a URL. The launch token works once: the
   first GET that carries it is answered with a redirect to ``/`` that sets
   the cookie ``keystay_ui_PORT=SESSION; HttpOnly; SameSite=Strict;
   Path=/``, and the launch token is dead from then on. One use matters
   because the link is on the browser's command line (``ps`` shows it to
   every local user while that process lives) and in the terminal; a spent
   link opened again in the browser that holds the session simply lands on
   the page. Every other request must carry the session: that cookie, or an
   ``X-Keystay-Token`` header (scripts, tests). Without it: 403, whatever
   the path (:func:`check_request`).

   Known limit: browsers scope cookies by host, not port, so the session
   cookie is also sent to any *other* server on 127.0.0.1 the employee's
   browser visits. The name carries the port so two pages do not clobber
   each other; a hostile local web server that the employee visits could
   still learn the session of a running page. Stopping the page (Ctrl-C)
   ends the session; nothing is kept.
2. **Host (DNS rebinding).** A hostile page can make its own name resolve to
   127.0.0.1; the browser then sends *its* name in ``Host``. Only
   ``127.0.0.1:PORT`` and ``localhost:PORT`` are served; anything else is
   refused with 421 before the token is even looked at.
3. **State-changing requests (CSRF).** Pause, resume and forget are POSTs.
   Each must carry the token in its form body (a hidden field the page
   renders) or header — a cookie alone is not enough, because the browser
   attaches cookies to requests other sites cause — *and* must not come from
   a foreign site: an ``Origin`` other than this server's, or a
   ``Sec-Fetch-Site`` other than ``same-origin``/``none``, is refused. The
   ``SameSite=Strict`` cookie is a third, independent layer.
4. Responses carry a strict Content-Security-Policy (only this server's own
   script and stylesheet; no inline script; ``frame-ancestors 'none'``),
   ``no-store`` caching and a same-origin referrer policy, so the page can
   neither be framed nor leak anything to another site.

Exit codes (``keystay device ui``): 0 stopped with Ctrl-C, 2 usage,
40 no running daemon for the data folder, 41 cannot listen on 127.0.0.1.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from keystay.client.ui import render
from keystay.client.ui.access import AccessError, DaemonAccess

log = logging.getLogger(__name__)


COOKIE = "keystay_ui"
HEADER = "X-Keystay-Token"
TOKEN_BYTES = 32  # 256 bits; at least 128 are needed against guessing

_STATIC = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Bodies are a few form fields; anything larger is not from our page.
_MAX_BODY = 16 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

PAUSE_CHOICES: dict[str, float] = {
    "15m": 900.0, "30m": 1800.0, "1h": 3600.0, "2h": 7200.0, "1d": 86400.0, "resume": 0.0,
}
"""Form value -> seconds; ``resume`` means "until I resume" (the daemon's 0)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    status: HTTPStatus
    reason: str


def check_request(
    *,
    method: str,
    headers: Mapping[str, str],
    form_token: str | None,
    token: str,
    port: int,
) -> Refusal | None:
    """Whether a request may be served (``None``) or why not.

    Pure, so each rule is tested on its own. ``token`` is the session
    secret; ``headers`` keys are canonical (the caller looks them up
    case-insensitively).
    """
    refusal = check_host(headers, port)
    if refusal is not None:
        return refusal
    allowed_hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
    cookie_token = session_from_cookie(headers.get("Cookie", ""), port)
    header_token = headers.get(HEADER)
    presented = [t for t in (cookie_token, header_token, form_token) if t]
    if not any(_same(t, token) for t in presented):
        return Refusal(HTTPStatus.FORBIDDEN,
                       "open the page with a fresh link: run 'keystay device ui' (each link "
                       "works once)")
    if method == "POST":
        if not (_same(form_token, token) or _same(header_token, token)):
            return Refusal(HTTPStatus.FORBIDDEN,
                           "a change must come from the page's own form (token missing)")
        origin = headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{h}" for h in allowed_hosts}:
            return Refusal(HTTPStatus.FORBIDDEN, "a change requested by another site is refused")
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return Refusal(HTTPStatus.FORBIDDEN, "a change requested by another site is refused")
    return None


def check_host(headers: Mapping[str, str], port: int) -> Refusal | None:
    """Refuse any ``Host`` but ``127.0.0.1:PORT`` / ``localhost:PORT`` (DNS rebinding)."""
    if headers.get("Host", "").lower() not in {f"127.0.0.1:{port}", f"localhost:{port}"}:
        return Refusal(HTTPStatus.MISDIRECTED_REQUEST,
                       "this page answers only to 127.0.0.1 or localhost on its own port")
    return None


def cookie_name(port: int) -> str:
    """The session cookie's name: per port, since cookies are not scoped by port."""
    return f"{COOKIE}_{port}"


def _same(presented: str | None, token: str) -> bool:
    return presented is not None and hmac.compare_digest(
        presented.encode("utf-8", "replace"), token.encode("utf-8")
    )


def session_from_cookie(header: str, port: int) -> str | None:
    """The session secret in a ``Cookie`` header, if any."""
    if not header:
        return None
    try:
        jar = SimpleCookie(header)
    except CookieError:
        return None
    morsel = jar.get(cookie_name(port))
    return morsel.value if morsel is not None else None


def _asset(name: str) -> bytes:
    return (resources.files("keystay.client.ui") / "static" / name).read_bytes()


class PageServer(ThreadingHTTPServer):
    """The HTTP server; holds the secrets, the port and the daemon adapter.

    ``token`` is the session secret (forms and cookie); ``launch_token`` the
    one-time secret of :attr:`url`. Tests may pin either.
    """

    daemon_threads = True

    def __init__(self, access: DaemonAccess, port: int = 0, token: str | None = None,
                 refresh: int = 30, launch_token: str | None = None) -> None:
        self.access = access
        self.refresh = refresh
        self.token = token or secrets.token_urlsafe(TOKEN_BYTES)
        self.launch_token = launch_token or secrets.token_urlsafe(TOKEN_BYTES)
        self._launch_lock = threading.Lock()
        self._launch_spent = False
        super().__init__(("127.0.0.1", port), _Handler)
        self.port = int(self.server_address[1])

    @property
    def url(self) -> str:
        """The link to open; it works once (see the module note)."""
        return f"http://127.0.0.1:{self.port}/?token={self.launch_token}"

    def spend_launch(self, presented: str) -> bool:
        """True exactly once: for the first request that shows the launch token."""
        with self._launch_lock:
            if self._launch_spent or not _same(presented, self.launch_token):
                return False
            self._launch_spent = True
            return True

    def start_background(self) -> threading.Thread:
        """Serve on a thread (tests); stop with :meth:`shutdown`."""
        thread = threading.Thread(target=self.serve_forever, name="keystay-ui", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "keystay-ui"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # Never log request lines: the first one carries the token.
        return

    # -- plumbing -------------------------------------------------------------

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        # same-origin, not no-referrer: under no-referrer browsers send
        # "Origin: null" with form posts, which the CSRF rule must refuse.
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _html(self, status: HTTPStatus, html: str) -> None:
        self._send(status, html.encode("utf-8"), "text/html; charset=utf-8")

    def _redirect(self, location: str, extra: Mapping[str, str] | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": location, **(extra or {})})

    def _refuse(self, refusal: Refusal) -> None:
        self._send(refusal.status, (refusal.reason + "\n").encode(), "text/plain; charset=utf-8")

    def _headers(self) -> dict[str, str]:
        # email.message lookups are case-insensitive; hand the rules canonical keys.
        return {name: str(self.headers[name])
                for name in ("Host", "Cookie", HEADER, "Origin", "Sec-Fetch-Site")
                if self.headers.get(name) is not None}

    def _launch(self, presented: str) -> None:
        """The launch link: swap it for the session cookie, once."""
        headers = self._headers()
        refusal = check_host(headers, self.server.port)
        if refusal is not None:
            self._refuse(refusal)
        elif self.server.spend_launch(presented):
            cookie = (f"{cookie_name(self.server.port)}={self.server.token}; HttpOnly; "
                      "SameSite=Strict; Path=/")
            self._redirect("/", {"Set-Cookie": cookie})
        elif _same(session_from_cookie(headers.get("Cookie", ""), self.server.port),
                   self.server.token):
            self._redirect("/")  # a spent link, opened again where the session lives
        else:
            self._refuse(Refusal(HTTPStatus.FORBIDDEN,
                                 "this link was already used or is wrong; run 'keystay device "
                                 "ui' again for a fresh one"))

    def _admit(self, form: Mapping[str, list[str]] | None) -> bool:
        refusal = check_request(
            method=self.command,
            headers=self._headers(),
            form_token=next(iter((form or {}).get("token", [])), None),
            token=self.server.token,
            port=self.server.port,
        )
        if refusal is not None:
            self._refuse(refusal)
            return False
        return True

    def _read_form(self) -> dict[str, list[str]] | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return None
        if length < 0 or length > _MAX_BODY:
            return None
        body = self.rfile.read(length).decode("utf-8", "replace")
        return parse_qs(body, keep_blank_values=True)

    # -- routes -----------------------------------------------------------------

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if "token" in query:
            self._launch(query["token"][0])
            return
        if not self._admit(None):
            return
        try:
            if parts.path == "/":
                self._html(HTTPStatus.OK, self._page(query.get("note", [""])[0]))
            elif parts.path.startswith("/static/") and parts.path[8:] in _STATIC:
                name = parts.path[8:]
                self._send(HTTPStatus.OK, _asset(name), _STATIC[name])
            elif parts.path == "/export":
                day = query.get("day", [""])[0]
                if not _DAY.match(day):
                    self._html(HTTPStatus.BAD_REQUEST, render.message_page(
                        "Export", "Choose a day (YYYY-MM-DD) to export."))
                    return
                body = self.server.access.export(day).encode("utf-8")
                self._send(HTTPStatus.OK, body, "application/json",
                           {"Content-Disposition": f'attachment; filename="keystay-{day}.json"'})
            else:
                self._html(HTTPStatus.NOT_FOUND, render.message_page(
                    "Not found", "There is no such page here."))
        except AccessError as error:
            self._html(HTTPStatus.SERVICE_UNAVAILABLE,
                       render.message_page("The daemon did not answer", str(error)))

    def do_POST(self) -> None:
        form = self._read_form()
        if form is None:
            self._refuse(Refusal(HTTPStatus.BAD_REQUEST, "the form could not be read"))
            return
        if not self._admit(form):
            return
        path = urlsplit(self.path).path
        token = self.server.token
        access = self.server.access
        try:
            if path == "/pause":
                choice = form.get("for", ["resume"])[0]
                if choice not in PAUSE_CHOICES:
                    self._refuse(Refusal(HTTPStatus.BAD_REQUEST, f"unknown pause length {choice}"))
                    return
                until = access.pause(PAUSE_CHOICES[choice])
                self._redirect("/?note=" + ("paused-until" if until else "paused"))
            elif path == "/resume":
                access.resume()
                self._redirect("/?note=resumed")
            elif path == "/forget":
                everything = form.get("all", [""])[0] == "1"
                days = [d for d in form.get("day", []) if _DAY.match(d)]
                if not everything and not days:
                    self._refuse(Refusal(HTTPStatus.BAD_REQUEST, "name a day to forget"))
                    return
                if form.get("confirm", [""])[0] != "yes":
                    # The confirmation step: nothing is deleted until the
                    # employee presses the second, explicit button.
                    self._html(HTTPStatus.OK, render.confirm_forget_page(days, everything, token))
                    return
                forgotten, destroyed = access.forget(days, everything)
                self._html(HTTPStatus.OK, render.forgotten_page(forgotten, destroyed))
            else:
                self._refuse(Refusal(HTTPStatus.NOT_FOUND, "no such action"))
        except AccessError as error:
            self._html(HTTPStatus.SERVICE_UNAVAILABLE,
                       render.message_page("The daemon refused or did not answer", str(error)))

    def _page(self, note: str) -> str:
        access = self.server.access
        status = access.status()
        show = access.show(None)
        return render.main_page(
            status=status,
            show=show,
            rounds=access.rounds(),
            day_ledger=access.day_ledger(),
            policy=access.policy_text(),
            token=self.server.token,
            note=note,
            refresh=self.server.refresh,
        )
