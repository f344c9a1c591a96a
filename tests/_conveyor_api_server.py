"""A Conveyor-compatible API server for the tests: real HTTP on 127.0.0.1, checked routes.

Every request is matched against the server's own OpenAPI file (its copy in
``tests/data/api-swagger.json``): an undocumented path or method, an undocumented query
parameter, or a body that is not of the documented shape is answered 400 *and* recorded in
``violations``, so a test can assert the client never strays from the contract. Answers are
checked against the documented responses the same way.

Behaviour follows the Go server (open-ug/conveyor) where the tests depend on it: Fiber's
non-strict routing (``/resources/`` is ``/resources``), a missing resource answered 500
"... not found", ``POST /logs`` answered 201 with the text ``Created``, and Server-Sent
Events with ``: heartbeat`` comments. With ``roots`` given, authentication is on and every
token is verified as ``internal/config/auth/middleware.go`` does (see :class:`TokenVerifier`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import hashlib
import json
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import attrs
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for

SWAGGER_FILE = Path(__file__).resolve().parent / "data" / "api-swagger.json"


def load_swagger() -> dict[str, Any]:
    if not SWAGGER_FILE.is_file():
        raise RuntimeError(
            f"{SWAGGER_FILE} is missing: the API tests check the client against this copy "
            "of the server's OpenAPI file"
        )
    return dict(json.loads(SWAGGER_FILE.read_text()))


# -- the OpenAPI contract ------------------------------------------------------------------


@attrs.frozen
class Operation:
    method: str
    template: str
    spec: dict[str, Any]

    @property
    def body_schema(self) -> dict[str, Any] | None:
        for param in self.spec.get("parameters", []):
            if param["in"] == "body":
                return dict(param["schema"])
        return None

    @property
    def query_names(self) -> set[str]:
        return {p["name"] for p in self.spec.get("parameters", []) if p["in"] == "query"}


class Contract:
    """The routes of ``api-swagger.json`` and a validator for its (Swagger 2.0) schemas."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.operations: dict[tuple[str, str], Operation] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        for template, methods in document["paths"].items():
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            self._patterns.append((re.compile(f"^{pattern}$"), template))
            for method, spec in methods.items():
                self.operations[(method.upper(), template)] = Operation(
                    method.upper(), template, spec
                )
        # Literal paths first: /resource-definitions/apply is not /resource-definitions/{name}.
        self._patterns.sort(key=lambda item: item[1].count("{"))

    def match(self, path: str) -> tuple[str, dict[str, str]] | None:
        for pattern, template in self._patterns:
            found = pattern.match(path)
            if found:
                return template, found.groupdict()
        return None

    def methods(self, template: str) -> set[str]:
        return {method for method, tmpl in self.operations if tmpl == template}

    def validate(self, schema: dict[str, Any], value: Any, where: str = "body") -> list[str]:
        """Problems of ``value`` against ``schema``; undocumented object keys count as one."""
        if "$ref" in schema:
            name = schema["$ref"].removeprefix("#/definitions/")
            return self.validate(self.document["definitions"][name], value, where)
        kind = schema.get("type")
        if kind is None:
            return []  # {}: any JSON value
        checks: dict[str, Callable[[Any], bool]] = {
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool),
        }
        if not checks[kind](value):
            return [f"{where}: expected {kind}, got {type(value).__name__} {value!r:.80}"]
        problems: list[str] = []
        if kind == "object":
            properties = schema.get("properties", {})
            extra = schema.get("additionalProperties", not properties)
            for key, item in value.items():
                if key in properties:
                    problems += self.validate(properties[key], item, f"{where}.{key}")
                elif isinstance(extra, dict):
                    problems += self.validate(extra, item, f"{where}.{key}")
                elif not extra:
                    problems.append(f"{where}: undocumented key {key!r}")
        if kind == "array":
            for index, item in enumerate(value):
                problems += self.validate(schema.get("items", {}), item, f"{where}[{index}]")
        return problems


# -- authentication, as the Go server does it ----------------------------------------------

ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "ES512")
_EC = {
    "ES256": (hashes.SHA256(), 32),
    "ES384": (hashes.SHA384(), 48),
    "ES512": (hashes.SHA512(), 66),
}


class AuthFailure(Exception):
    """A refused token: ``answer`` is what the client sees, ``reason`` what the server logs."""

    def __init__(self, answer: str, reason: str) -> None:
        super().__init__(reason)
        self.answer = answer
        self.reason = reason


def _b64url_raw(segment: str) -> bytes:
    # golang-jwt v5 decodes with RawURLEncoding: no padding, URL alphabet only.
    if "=" in segment or not re.fullmatch(r"[A-Za-z0-9_-]*", segment):
        raise ValueError("illegal base64url data")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class TokenVerifier:
    """``JWTCertMiddleware`` of the Conveyor server, step by step.

    1. ``Authorization: Bearer <token>``; 2. golang-jwt parses it with the methods RS256,
    PS256, ES256, ES384, ES512; its key function decodes ``x5c`` (standard base64 DER),
    verifies the chain to the CA with Go's defaults (``x509.VerifyOptions`` with no key
    usages means *server auth*), checks ``cnf.x5t#S256`` (or ``cnf.jkt``) against the
    leaf's SHA-256 and returns the leaf's key; the parser verifies the signature and
    rejects a passed ``exp`` or a future ``nbf``; 3. the middleware rejects a passed
    ``exp`` and an ``iat`` in the future. Any failure of step 2 answers "invalid token".
    """

    def __init__(self, roots: Iterable[x509.Certificate], clock: Callable[[], float]) -> None:
        self.roots = list(roots)
        self.clock = clock

    def verify(self, authorization: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        if not authorization:
            raise AuthFailure("missing Authorization header", "no header")
        parts = authorization.split(" ", 1)
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise AuthFailure("invalid Authorization header format", "not a bearer token")
        try:
            header, claims = self._parse(parts[1])
        except AuthFailure:
            raise
        except Exception as exc:  # golang-jwt's every parse error
            raise AuthFailure("invalid token", f"token parse error: {exc}") from None
        now = self.clock()
        exp = claims.get("exp")
        if isinstance(exp, int | float) and int(exp) < now:
            raise AuthFailure("token expired", "token expired")
        iat = claims.get("iat")
        if isinstance(iat, int | float) and int(iat) > now:
            raise AuthFailure("token issued in the future", "token issued in the future")
        return header, claims

    def _parse(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        segments = token.split(".")
        if len(segments) != 3:
            raise ValueError("token contains an invalid number of segments")
        header = json.loads(_b64url_raw(segments[0]))
        claims = json.loads(_b64url_raw(segments[1]))
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise ValueError("token is malformed")
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise ValueError(f"signing method {alg} is invalid")
        leaf = self._key_function(header, claims)
        signature = _b64url_raw(segments[2])
        _verify_signature(alg, leaf.public_key(), f"{segments[0]}.{segments[1]}", signature)
        now = self.clock()
        for claim in ("exp", "nbf", "iat"):
            if claim in claims and not isinstance(claims[claim], int | float):
                raise ValueError(f"invalid type for claim {claim}")
        if "exp" in claims and now > claims["exp"]:
            raise ValueError("token has invalid claims: token is expired")
        if "nbf" in claims and now < claims["nbf"]:
            raise ValueError("token has invalid claims: token is not valid yet")
        return header, claims

    def _key_function(self, header: dict[str, Any], claims: dict[str, Any]) -> x509.Certificate:
        x5c = header.get("x5c")
        if x5c is None:
            raise ValueError("missing x5c header")
        if not isinstance(x5c, list) or not x5c:
            raise ValueError("x5c parse: x5c header missing or not an array")
        certs = []
        for entry in x5c:
            if not isinstance(entry, str):
                raise ValueError("x5c parse: x5c entry not string")
            try:
                der = base64.b64decode(entry, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"x5c parse: base64 decode x5c: {exc}") from None
            certs.append(x509.load_der_x509_certificate(der))
        leaf = certs[0]
        verify_chain(leaf, certs[1:], self.roots, self.clock())
        cnf = claims.get("cnf")
        if cnf is None:
            raise ValueError("cnf claim missing")
        if not isinstance(cnf, dict):
            raise ValueError("cnf claim not an object")
        thumb = (
            base64.urlsafe_b64encode(hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest())
            .rstrip(b"=")
            .decode()
        )
        for field in ("x5t#S256", "jkt"):
            if field in cnf:
                if cnf[field] != thumb:
                    raise ValueError(f"cnf.{field} does not match certificate thumbprint")
                return leaf
        raise ValueError("cnf did not contain recognized thumbprint fields (x5t#S256 or jkt)")


def _verify_signature(alg: str, key: Any, signing_input: str, signature: bytes) -> None:
    data = signing_input.encode()
    try:
        if alg in ("RS256", "PS256"):
            if not isinstance(key, rsa.RSAPublicKey):
                raise ValueError("key is of invalid type")
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg == "RS256"
                else padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)
            )
            key.verify(signature, data, pad, hashes.SHA256())
            return
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("key is of invalid type")
        digest, size = _EC[alg]
        if len(signature) != 2 * size:
            raise ValueError("ECDSA verification failed")
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(digest))
    except InvalidSignature:
        raise ValueError("token signature is invalid") from None


def verify_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: float,
) -> None:
    """``leaf.Verify`` with Go's defaults: some path to a root, every link valid at ``now``,
    issuers that are CAs, and extended key usages compatible with *server auth*."""
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)

    def valid(cert: x509.Certificate) -> bool:
        return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc

    def is_ca(cert: x509.Certificate) -> bool:
        try:
            return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        except x509.ExtensionNotFound:
            return False

    def eku_ok(cert: x509.Certificate) -> bool:
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return True
        return ExtendedKeyUsageOID.SERVER_AUTH in usages or (
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages
        )

    if not valid(leaf):
        raise ValueError(
            "certificate chain verification failed: x509: certificate has expired or is not "
            "yet valid"
        )
    problems: list[str] = []

    def extend(chain: list[x509.Certificate]) -> bool:
        current = chain[-1]
        if len(chain) > 10:
            return False
        for is_root, candidates in ((True, roots), (False, intermediates)):
            for candidate in candidates:
                if candidate in chain or candidate.subject != current.issuer:
                    continue
                try:
                    current.verify_directly_issued_by(candidate)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                if not is_ca(candidate) or not valid(candidate):
                    problems.append("issuer not authorized or not valid")
                    continue
                path = [*chain, candidate]
                if is_root:
                    if all(eku_ok(cert) for cert in path):
                        return True
                    problems.append("incompatible key usage")
                    continue
                if extend(path):
                    return True
        return False

    if not extend([leaf]):
        if "incompatible key usage" in problems:
            raise ValueError(
                "certificate chain verification failed: x509: certificate specifies an "
                "incompatible key usage"
            )
        raise ValueError(
            "certificate chain verification failed: x509: certificate signed by unknown authority"
        )


# -- the server -----------------------------------------------------------------------------


@attrs.define
class Recorded:
    """One request as the server saw it (after the prefix)."""

    method: str
    path: str
    template: str | None
    params: dict[str, str]
    query: dict[str, str]
    body: Any
    authorization: str | None


@attrs.define
class Fault:
    """A scripted misbehaviour for the next ``times`` matching requests."""

    status: int | None = None
    body: Any = None
    delay: float = 0.0
    drop: bool = False
    method: str | None = None
    template: str | None = None
    times: int = 1


_END = object()


class ConveyorAPIServer:
    """The test server; use as ``async with ConveyorAPIServer() as server``."""

    def __init__(
        self,
        *,
        prefix: str = "",
        roots: Iterable[x509.Certificate] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat: float | None = 0.05,
        clock_offset: float = 0.0,
    ) -> None:
        self.contract = Contract(load_swagger())
        self.prefix = prefix.rstrip("/")
        self.clock_offset = clock_offset
        self.verifier = (
            TokenVerifier(roots, lambda: time.time() + self.clock_offset)
            if roots is not None
            else None
        )
        self.ssl_context = ssl_context
        self.heartbeat = heartbeat
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.auth_failures: list[str] = []
        self.tokens: list[str] = []
        self.faults: list[Fault] = []
        # The store, keyed as the Go server keys etcd.
        self.resources: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.definitions: dict[str, dict[str, Any]] = {}
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.logs: list[dict[str, Any]] = []
        self.broadcasts: list[dict[str, Any]] = []
        #: The problems of each resource refused by its definition's schema.
        self.refused_specs: list[list[str]] = []
        self.heartbeats_sent = 0
        self.streams_open = 0
        self.streams_closed_by_client = 0
        self._streams: list[tuple[str, str | None, asyncio.Queue[Any]]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.prefix}"

    async def __aenter__(self) -> ConveyorAPIServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.end_streams()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- scripting ----------------------------------------------------------------------------

    def fail(self, status: int | None = None, **options: Any) -> Fault:
        fault = Fault(status=status, **options)
        self.faults.append(fault)
        return fault

    def define(self, name: str, schema: Any = None) -> None:
        self.definitions[name] = {
            "id": str(uuid.uuid4()),
            "name": name,
            "description": "",
            "version": "1",
            # {} accepts every spec (null included), as a definition written to type nothing.
            "schema": schema if schema is not None else {},
        }

    def publish(self, entry: dict[str, Any]) -> None:
        """A live log line, as the server relays ``live.logs.<run>.<driver>``."""
        self.push_raw(
            entry["runid"], entry["driver"], b"data: " + json.dumps(entry).encode() + b"\n\n"
        )

    def push_raw(self, run_id: str, driver: str, data: bytes) -> None:
        for run, only_driver, queue in self._streams:
            if run == run_id and only_driver in (None, driver):
                queue.put_nowait(data)

    def end_streams(self) -> None:
        for _run, _driver, queue in self._streams:
            queue.put_nowait(_END)

    def calls(self, method: str, template: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.template == template]

    # -- the one handler ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # Routes match the path as sent, so an encoded "/" in a name stays inside its segment.
        path = request.rel_url.raw_path
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return _json(404, {"error": f"Cannot {request.method} {path}"})
            path = path[len(self.prefix) :]
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        # Fiber routes without strict routing: a trailing slash names the same route.
        route_path = path.rstrip("/") or "/"
        found = self.contract.match(route_path)
        template, params = found if found else (None, {})
        params = {key: unquote(value) for key, value in params.items()}
        self.requests.append(
            Recorded(
                request.method,
                path,
                template,
                params,
                dict(request.query),
                body,
                request.headers.get("Authorization"),
            )
        )
        if template is None:
            return self._violation(404, f"{request.method} {path}: undocumented path")
        operation = self.contract.operations.get((request.method, template))
        if operation is None:
            return self._violation(405, f"{request.method} {template}: undocumented method")

        if self.verifier is not None and not path.startswith(("/health", "/swagger", "/metrics")):
            try:
                self.verifier.verify(request.headers.get("Authorization"))
            except AuthFailure as failure:
                self.auth_failures.append(failure.reason)
                return _json(401, {"error": failure.answer})
            self.tokens.append(request.headers["Authorization"].split(" ", 1)[1])

        problems = self._check_request(operation, request, body, raw)
        if problems:
            return self._violation(400, "; ".join(problems))

        fault = self._take_fault(request.method, template)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            if fault.status is not None:
                answer = fault.body if fault.body is not None else {"error": "scripted failure"}
                if isinstance(answer, str):
                    return web.Response(status=fault.status, text=answer)
                return _json(fault.status, answer)

        handler = getattr(self, "_" + _handler_name(operation))
        response: web.StreamResponse = await handler(request, params, body)
        if isinstance(response, web.Response) and response.status < 600:
            self._check_response(operation, response)
        return response

    def _violation(self, status: int, problem: str) -> web.Response:
        self.violations.append(problem)
        return _json(status, {"error": problem})

    def _take_fault(self, method: str, template: str) -> Fault | None:
        for fault in self.faults:
            if (
                fault.times > 0
                and fault.method in (None, method)
                and (fault.template in (None, template))
            ):
                fault.times -= 1
                return fault
        return None

    def _check_request(
        self, operation: Operation, request: web.Request, body: Any, raw: bytes
    ) -> list[str]:
        where = f"{operation.method} {operation.template}"
        problems = [
            f"{where}: undocumented query parameter {name!r}"
            for name in request.query
            if name not in operation.query_names
        ]
        schema = operation.body_schema
        if schema is None:
            if raw:
                problems.append(f"{where}: a body where none is documented")
            return problems
        if not raw:
            return [*problems, f"{where}: the documented body is missing"]
        if request.content_type != "application/json":
            problems.append(f"{where}: body sent as {request.content_type}, not application/json")
        return problems + self.contract.validate(schema, body, f"{where} body")

    def _check_response(self, operation: Operation, response: web.Response) -> None:
        where = f"{operation.method} {operation.template} answer {response.status}"
        documented = operation.spec.get("responses", {}).get(str(response.status))
        if documented is None:
            self.violations.append(f"{where}: undocumented status")
            return
        schema = documented.get("schema")
        if schema is None or schema.get("type") == "string" or not response.body:
            return
        assert isinstance(response.body, bytes)
        self.violations += self.contract.validate(schema, json.loads(response.body), where)

    # -- behaviour, one method per operation ------------------------------------------------

    async def _get_health(self, *_: Any) -> web.Response:
        return _json(200, {"status": "healthy", "time": int(time.time())})

    async def _post_resources(self, _r: web.Request, _p: Any, body: Any) -> web.Response:
        kind, name = body.get("resource", ""), body.get("name", "")
        if not kind:
            return _json(400, {"error": "Resource type is required"})
        if kind not in self.definitions:
            return _json(404, {"error": f"Resource definition for type {kind} not found"})
        invalid = self._invalid_spec(kind, body)
        if invalid is not None:
            return invalid
        if (kind, name) in self.resources:
            return _json(
                500,
                {
                    "error": f"Failed to insert resource: resource with name {name} "
                    f"and type {kind} already exists"
                },
            )
        stored = {**body, "id": str(uuid.uuid4()), "metadata": {"version": "1"}}
        self.resources[(kind, name)] = [stored]
        return _json(
            201,
            {
                "name": name,
                "runid": str(uuid.uuid4()),
                "message": "Resource created successfully",
                "version": "1",
            },
        )

    async def _get_resources_type(self, _r: Any, params: dict[str, str], _b: Any) -> web.Response:
        kind = params["type"]
        return _json(200, [v[-1] for (k, _n), v in self.resources.items() if k == kind])

    def _invalid_spec(self, kind: str, body: Any) -> web.Response | None:
        """The server's check of a resource against its definition (``utils.ValidateResource``).

        Only the spec is validated, with the definition's schema (draft 2020-12 unless the
        schema says otherwise, as santhosh-tekuri/jsonschema v5 compiles it).
        """
        definition = self.definitions.get(kind)
        schema = definition.get("schema") if definition else None
        if schema is None:
            return None
        validator = validator_for(schema, default=Draft202012Validator)(schema)
        problems = sorted(validator.iter_errors(body.get("spec")), key=str)
        if problems:
            self.refused_specs.append([p.message for p in problems])
            return _json(
                400,
                {"error": f"Resource validation failed: validation failed: {problems[0].message}"},
            )
        return None

    def _missing(self, params: dict[str, str]) -> web.Response:
        return _json(
            500,
            {
                "error": f"Failed to find resource: resource with name {params['name']} "
                f"and type {params['type']} not found"
            },
        )

    async def _get_resources_type_name(
        self, _r: Any, params: dict[str, str], _b: Any
    ) -> web.Response:
        versions = self.resources.get((params["type"], params["name"]))
        return _json(200, versions[-1]) if versions else self._missing(params)

    async def _get_resources_type_name_version(
        self, _r: Any, params: dict[str, str], _b: Any
    ) -> web.Response:
        for resource in self.resources.get((params["type"], params["name"]), []):
            if resource["metadata"].get("version") == params["version"]:
                return _json(200, resource)
        return _json(404, {"error": "Resource not found"})

    async def _put_resources_type_name(
        self, _r: Any, params: dict[str, str], body: Any
    ) -> web.Response:
        versions = self.resources.get((params["type"], params["name"]))
        if not versions:
            return self._missing(params)
        invalid = self._invalid_spec(params["type"], body)
        if invalid is not None:
            return invalid
        stored = {
            **body,
            "id": versions[-1]["id"],
            "metadata": {**(body.get("metadata") or {}), "version": str(len(versions) + 1)},
        }
        versions.append(stored)
        return _json(200, stored)

    async def _delete_resources_type_name(
        self, _r: Any, params: dict[str, str], _b: Any
    ) -> web.Response:
        if (params["type"], params["name"]) not in self.resources:
            return self._missing(params)
        del self.resources[(params["type"], params["name"])]
        return web.Response(status=204)

    # Resource definitions as internal/handlers/resource_definitions.go keeps them in etcd:
    # an existing name is refused by create, a missing one answered 500 "... not found".

    def _no_definition(self, verb: str, name: str) -> web.Response:
        return _json(
            500,
            {
                "error": f"Failed to {verb} resource definition: resource definition "
                f"with name {name} not found"
            },
        )

    async def _post_resource_definitions(self, _r: Any, _p: Any, body: Any) -> web.Response:
        name = body.get("name", "")
        if name in self.definitions:
            return _json(
                500,
                {
                    "error": "Failed to insert resource definition: resource definition "
                    f"with name {name} already exists"
                },
            )
        stored = {**body, "id": str(uuid.uuid4())}
        self.definitions[name] = stored
        return _json(201, stored)

    async def _post_resource_definitions_apply(self, _r: Any, _p: Any, body: Any) -> web.Response:
        name = body.get("name", "")
        if not name:
            return _json(400, {"error": "Resource name is required"})
        if name in self.definitions:
            self.definitions[name] = dict(body)  # stored as sent, id included
            return _json(201, body)
        # The Go handler sets the id after marshalling what it stores: only the answer has it.
        self.definitions[name] = dict(body)
        return _json(201, {**body, "id": str(uuid.uuid4())})

    async def _get_resource_definitions_name(
        self, _r: Any, params: dict[str, str], _b: Any
    ) -> web.Response:
        found = self.definitions.get(params["name"])
        if found is None:
            return self._no_definition("find", params["name"])
        return _json(200, found)

    async def _put_resource_definitions_name(
        self, _r: Any, params: dict[str, str], body: Any
    ) -> web.Response:
        if params["name"] not in self.definitions:
            return self._no_definition("update", params["name"])
        self.definitions[params["name"]] = body
        return _json(200, body)

    async def _delete_resource_definitions_name(
        self, _r: Any, params: dict[str, str], _b: Any
    ) -> web.Response:
        if self.definitions.pop(params["name"], None) is None:
            return self._no_definition("delete", params["name"])
        return web.Response(status=204)

    async def _post_pipelines(self, _r: Any, _p: Any, body: Any) -> web.Response:
        self.pipelines[body["name"]] = body
        return _json(201, body)

    async def _get_pipelines_name(self, _r: Any, params: dict[str, str], _b: Any) -> web.Response:
        found = self.pipelines.get(params["name"])
        if found is None:
            return _json(404, {"error": f"pipeline {params['name']} not found"})
        return _json(200, found)

    async def _put_pipelines_name(self, _r: Any, params: dict[str, str], body: Any) -> web.Response:
        if params["name"] not in self.pipelines:
            return _json(404, {"error": f"pipeline {params['name']} not found"})
        self.pipelines[params["name"]] = body
        return _json(200, body)

    async def _delete_pipelines_name(
        self, _r: Any, params: dict[str, str], _b: Any
    ) -> web.Response:
        if self.pipelines.pop(params["name"], None) is None:
            return _json(404, {"error": f"pipeline {params['name']} not found"})
        return web.Response(status=204)

    async def _get_logs(self, request: web.Request, _p: Any, _b: Any) -> web.Response:
        query = request.query
        found = [
            entry
            for entry in self.logs
            if all(
                entry[key] == query[key] for key in ("pipeline", "driver", "runid") if key in query
            )
        ]
        return _json(200, found)

    async def _post_logs(self, _r: Any, _p: Any, body: Any) -> web.Response:
        self.logs.append(body)
        return web.Response(status=201, text="Created")  # Fiber's SendStatus

    async def _post_drivers_broadcast_message(self, _r: Any, _p: Any, body: Any) -> web.Response:
        self.broadcasts.append(body)
        return _json(200, {"message": "message published"})

    async def _get_logs_pipeline_runid(
        self, request: web.Request, params: dict[str, str], _b: Any
    ) -> web.StreamResponse:
        return await self._stream(request, params["runid"], None)

    async def _get_logs_streams_drivername_runid(
        self, request: web.Request, params: dict[str, str], _b: Any
    ) -> web.StreamResponse:
        return await self._stream(request, params["runid"], params["drivername"])

    async def _stream(
        self, request: web.Request, run_id: str, driver: str | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        entry = (run_id, driver, queue)
        self._streams.append(entry)
        self.streams_open += 1
        try:
            for line in self.logs:  # replay what is stored, as the server does
                if line["runid"] == run_id and driver in (None, line["driver"]):
                    await response.write(b"data: " + json.dumps(line).encode() + b"\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.heartbeat)
                except TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    self.heartbeats_sent += 1
                    continue
                if item is _END:
                    break
                await response.write(item)
        except (ConnectionError, RuntimeError):
            self.streams_closed_by_client += 1
            return response
        finally:
            self._streams.remove(entry)
            self.streams_open -= 1
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response


def _handler_name(operation: Operation) -> str:
    words = re.sub(r"[{}]", "", operation.template).replace("-", "_").strip("/").split("/")
    return "_".join([operation.method.lower(), *[w for w in words if w]])


def _json(status: int, value: Any) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(value).encode(), content_type="application/json"
    )


@contextlib.asynccontextmanager
async def api_server(**options: Any) -> AsyncIterator[ConveyorAPIServer]:
    async with ConveyorAPIServer(**options) as server:
        yield server
