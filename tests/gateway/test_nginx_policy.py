"""The shipped nginx config sends HSTS and a CSP, and every admin and API docs page works under that CSP.

The pages are rendered through Django's full stack; each script, style, image and form they (and the
stylesheets they load) refer to is checked against the policy's directives, the way a browser would.
"""

from __future__ import annotations

import re
import uuid
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from resource_server.models import ApiKey, Cluster, Endpoint, User
from resource_server.services.api_keys import api_key_create

NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
ORIGIN = "https://gateway.example.org"
# Data blocks: browsers do not run them, so CSP does not govern them.
DATA_SCRIPT_TYPES = {"application/json", "application/ld+json", "text/template"}


def https_server_block() -> str:
    config = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    blocks = re.findall(r"server\s*\{((?:[^{}]|\{[^{}]*\})*)\}", config)
    [https] = [block for block in blocks if re.search(r"listen\s+443\b", block)]
    return https


def server_headers() -> dict[str, str]:
    """The add_header lines of the HTTPS server block; every one must say `always`."""
    https = https_server_block()
    top_level = re.sub(r"location[^{]*\{[^{}]*\}", "", https)
    headers = {}
    for name, value, always in re.findall(r'add_header\s+(\S+)\s+"([^"]*)"\s*(always)?\s*;', top_level):
        assert always, f"{name} is not sent on error responses (add 'always')"
        headers[name.lower()] = value
    return headers


def csp() -> dict[str, list[str]]:
    policy = server_headers()["content-security-policy"]
    directives = {}
    for directive in filter(None, (part.strip() for part in policy.split(";"))):
        name, *sources = directive.split()
        directives[name] = sources
    return directives


def allowed(url: str, directive: str, page_url: str) -> bool:
    policy = csp()
    sources = policy.get(directive, policy.get("default-src", []))
    absolute = urljoin(ORIGIN + page_url, url)
    parts = urlsplit(absolute)
    if parts.scheme == "data":
        return "data:" in sources
    if f"{parts.scheme}://{parts.netloc}" == ORIGIN and "'self'" in sources:
        return True
    return any(source.rstrip("/") == f"{parts.scheme}://{parts.netloc}" for source in sources)


class Loads(HTMLParser):
    """What a page makes the browser load or run, as (directive, url or description)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []
        self.inline: list[str] = []
        self._in_script: str | None = None
        self._script_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        for name, value in attributes.items():
            if name.startswith("on"):
                self.inline.append(f"<{tag} {name}=...> event handler")
            if name == "style":
                self.inline.append(f"<{tag} style={value!r}>")
            if name in ("href", "src", "action") and value.strip().lower().startswith("javascript:"):
                self.inline.append(f"<{tag} {name}=javascript:...>")
        if tag == "script":
            if "src" in attributes:
                self.loads.append(("script-src", attributes["src"]))
            else:
                self._in_script = attributes.get("type", "text/javascript")
                self._script_text = ""
        elif tag == "style":
            self.inline.append("<style> element")
        elif tag == "link":
            rel = attributes.get("rel", "").lower().split()
            if "stylesheet" in rel:
                self.loads.append(("style-src", attributes["href"]))
            elif "icon" in rel:
                self.loads.append(("img-src", attributes["href"]))
        elif tag == "img":
            self.loads.append(("img-src", attributes.get("src", "")))
        elif tag == "form" and attributes.get("action"):
            self.loads.append(("form-action", attributes["action"]))
        elif tag in ("iframe", "object", "embed", "base"):
            self.inline.append(f"<{tag}>")

    def handle_data(self, data: str) -> None:
        if self._in_script is not None:
            self._script_text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._in_script is not None:
            if self._in_script not in DATA_SCRIPT_TYPES and self._script_text.strip():
                self.inline.append(f"inline <script>: {self._script_text.strip()[:80]!r}")
            self._in_script = None


def violations(client: Client, page_url: str, html: str) -> list[str]:
    parser = Loads()
    parser.feed(html)
    found = [f"{page_url}: {what} needs 'unsafe-inline'" for what in parser.inline]
    for directive, url in parser.loads:
        if not allowed(url, directive, page_url):
            found.append(f"{page_url}: {directive} does not allow {url}")
        elif directive == "style-src":
            found += stylesheet_violations(client, urljoin(page_url, url))
    return found


def stylesheet_violations(client: Client, url: str, seen: set[str] | None = None) -> list[str]:
    """url(...) and @import in a stylesheet the page loads (served by Django's static view in tests)."""
    seen = seen if seen is not None else set()
    path = urlsplit(url).path
    if path in seen or urlsplit(urljoin(ORIGIN, url)).netloc != urlsplit(ORIGIN).netloc:
        return []
    seen.add(path)
    response = client.get(path)
    assert response.status_code == 200, f"{path} is not served"
    css = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
    found = []
    for ref in re.findall(r"@import\s+(?:url\()?\s*['\"]?([^'\")\s;]+)", css):
        target = urljoin(path, ref)
        if not allowed(target, "style-src", path):
            found.append(f"{path}: @import of {ref} is not allowed by style-src")
        else:
            found += stylesheet_violations(client, target, seen)
    for ref in re.findall(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)", css):
        # Images and fonts: a stylesheet's url() is one or the other; both directives must allow it.
        for directive in ("img-src", "font-src") if not ref.startswith("data:") else ("img-src",):
            if not allowed(urljoin(path, ref), directive, path):
                found.append(f"{path}: url({ref[:40]}) is not allowed by {directive}")
    return found


def test_https_responses_carry_hsts_for_a_year() -> None:
    hsts = server_headers()["strict-transport-security"]
    match = re.search(r"max-age=(\d+)", hsts)
    assert match is not None and int(match.group(1)) >= 31_536_000


def test_csp_allows_no_inline_code_plugins_or_framing() -> None:
    policy = csp()
    for directive in ("script-src", "style-src"):
        assert not {"'unsafe-inline'", "'unsafe-eval'", "*"} & set(policy[directive]), directive
    assert policy["object-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'self'"]


def test_no_location_drops_the_security_headers() -> None:
    for location in re.findall(r"location[^{]*\{[^{}]*\}", https_server_block()):
        assert "add_header" not in location, f"this location would drop the server's headers: {location}"


def test_every_proxied_location_streams_and_keeps_the_forwarded_headers() -> None:
    """The proxy settings are the server's, set once: a location with a proxy_set_header of its own would inherit
    none of the server's (Host, X-Forwarded-For, the keep-alive Connection)."""
    https = https_server_block()
    server_level = re.sub(r"location[^{]*\{[^{}]*\}", "", https)
    for setting in (
        r"proxy_http_version\s+1\.1;",
        r'proxy_set_header\s+Connection\s+"";',
        r"proxy_set_header\s+Host\s+\$host;",
        r"proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for;",
        r"proxy_set_header\s+X-Forwarded-Proto\s+\$scheme;",
        r"proxy_buffering\s+off;",
        r"proxy_cache\s+off;",
    ):
        assert re.search(setting, server_level), setting
    proxied = [location for location in re.findall(r"location[^{]*\{[^{}]*\}", https) if "proxy_pass" in location]
    assert len(proxied) == 2
    for location in proxied:
        assert "proxy_set_header" not in location and "proxy_buffering" not in location, location


def test_plain_http_only_redirects_to_https() -> None:
    config = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    [plain] = re.findall(r"server\s*\{([^{}]*listen\s+80\b[^{}]*)\}", config)
    assert re.search(r"return\s+301\s+https://", plain)


@pytest.mark.django_db
def test_every_admin_page_works_under_the_csp(client: Client) -> None:
    login = client.get("/admin/login/")
    pages = [("/admin/login/", login.content.decode())]
    admin = get_user_model().objects.create_superuser(f"root-{uuid.uuid4().hex[:6]}", "r@example.org", "pw-12345678")
    client.force_login(admin)
    cluster = Cluster.objects.create(name="polaris")
    endpoint = Endpoint.objects.create(cluster=cluster, model="m", backend_config={"base_url": "http://n:8000/v1"})
    owner = User.objects.create(identity_id="id-1", username="ada@anl.gov")
    key, _ = api_key_create(owner=owner, name="workflow")
    urls = ["/admin/", "/admin/resource_server/", "/admin/password_change/"]
    for model, obj in (("cluster", cluster), ("endpoint", endpoint), ("user", owner), ("apikey", key)):
        urls += [f"/admin/resource_server/{model}/", f"/admin/resource_server/{model}/add/"]
        urls += [f"/admin/resource_server/{model}/{obj.pk}/change/", f"/admin/resource_server/{model}/{obj.pk}/delete/"]
    urls += ["/admin/resource_server/requestlog/", "/admin/resource_server/computefunction/", "/admin/auth/user/"]
    urls += ["/admin/resource_server/endpoint/?enabled__exact=1", "/admin/resource_server/apikey/?q=ada"]
    for model in ("limit", "project"):
        urls += [f"/admin/resource_server/{model}/", f"/admin/resource_server/{model}/add/"]
    urls += ["/admin/resource_server/requestlog/?status=4&q=ada"]
    urls += ["/admin/resource_server/usagedaily/", "/admin/resource_server/usagedaily/?days=365"]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        pages.append((url, response.content.decode()))
    add = "/admin/resource_server/apikey/add/"
    pages.append((add, client.post(add, {"owner": str(owner.pk), "name": "second"}).content.decode()))
    assert ApiKey.objects.count() == 2, "the new key's page was not rendered"
    found = [problem for url, html in pages for problem in violations(client, url, html)]
    assert found == []


@pytest.mark.django_db
def test_api_docs_work_under_the_csp_with_no_cdn(client: Client) -> None:
    response = client.get("/resource_server/docs")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html
    assert violations(client, "/resource_server/docs", html) == []
    parser = Loads()
    parser.feed(html)
    scripts = [url for directive, url in parser.loads if directive == "script-src"]
    assert scripts and all(url.startswith("/static/") for url in scripts), scripts
    for url in scripts:
        assert client.get(url).status_code == 200, f"{url} is not served"
