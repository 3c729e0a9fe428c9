"""Bearer token authentication of the API: `setup_auth` and `check_token`.

Unless the node runs with `--dev`, every request needs `Authorization: Bearer TOKEN`
with a token from the node's token file (see `voxanode.tokens`), except:

- `GET` and `HEAD` of `/status/health`, so that load balancers and the devnet
  harness can probe a node without a token;
- every route under `/internal/`: the node-to-node routes, which check a signature
  by the calling node's key themselves;
- every route under `/proxy/`: app traffic, not API calls. Its Authorization header,
  if any, belongs to the app and passes to it untouched;
- `GET` and `HEAD` of the web dashboard's page `/ui/`, its redirect `/ui` and its
  files `/ui/static/NAME`, which contain no data. The page's script sends a token.

A websocket upgrade request without an Authorization header may carry the token in
the `access_token` query parameter (RFC 6750, section 2.3) instead, because browsers
cannot set headers on a websocket. Other requests must use the header.

GET and HEAD need scope read, every other method scope write; admin includes write.
A token created with `voxanode token create` works at once, because an unknown token
makes the node check the token file. A revoked token is rejected within one second
(`TOKEN_FILE_CHECK_INTERVAL_SECONDS`), the time between two checks of the file.
A missing or wrong token gets 401 AUTHENTICATION_REQUIRED with a `WWW-Authenticate`
challenge, and a token whose scope is too low gets 403 AUTHORIZATION_FAILED.
`check_token` raises ApiError, so it runs as a check of the API middleware, which
renders the error envelope.

Tokens and the Authorization header are never logged; log lines name the token id.
"""

import logging
import time

from aiohttp import web

from voxanode.api.errors import ApiError, ErrorCode
from voxanode.api.keys import NODE_KEY, request_id_of
from voxanode.api.routes import slash_variants
from voxanode.api.routes.proxy import PROXY_PREFIX
from voxanode.api.routes.ui import UI_ASSET_PATH, UI_PATH, UI_REDIRECT_PATH
from voxanode.settings import Settings
from voxanode.tokens import (
    Scope,
    TokenRecord,
    TokenStore,
    is_well_formed_token,
    token_file_path,
)

AUTH_REALM = "voxanode"
BEARER_SCHEME = "bearer"
OPEN_PATHS = frozenset(
    (*slash_variants("/status/health"), UI_PATH, UI_REDIRECT_PATH, UI_ASSET_PATH)
)
OPEN_METHODS = frozenset({"GET", "HEAD"})
INTERNAL_PATH_PREFIX = "/internal/"
READ_METHODS = frozenset({"GET", "HEAD"})
WEBSOCKET_TOKEN_PARAMETER = "access_token"
# A revoked token still in use is logged at INFO at most once per token in this time.
REVOKED_USE_LOG_INTERVAL_SECONDS = 60.0
CREATE_TOKEN_HINT = "create one with `voxanode token create --scope SCOPE --name NAME`"
INVALID_TOKEN_MESSAGE = (
    "the bearer token is unknown to this node or revoked; use a token created for this"
    f" node's data directory, or {CREATE_TOKEN_HINT}"
)

logger = logging.getLogger(__name__)


class Authenticator:
    """The token store of one API app, and the state of its rate-limited log lines."""

    def __init__(self, store: TokenStore):
        self.store = store
        self._revoked_use_logged_at: dict[str, float] = {}

    def authenticate(self, request: web.Request) -> TokenRecord:
        """Return the token entry of an authenticated request, or raise a 401 ApiError."""
        token = _bearer_token(request)
        self.store.refresh_if_due()
        record = self.store.find(token)
        if record is None:
            # A token created since the last check works at once: an unknown token
            # costs a check of the file, as every request did before the interval.
            self.store.refresh()
            record = self.store.find(token)
        if record is None:
            logger.debug(
                "rejected an unknown bearer token request_id=%s remote=%s",
                request_id_of(request),
                request.remote,
            )
            raise _unauthenticated(INVALID_TOKEN_MESSAGE, invalid=True)
        if not record.active:
            self._log_revoked_use(request, record)
            raise _unauthenticated(INVALID_TOKEN_MESSAGE, invalid=True)
        return record

    def _log_revoked_use(self, request: web.Request, record: TokenRecord) -> None:
        now = time.monotonic()
        last = self._revoked_use_logged_at.get(record.id)
        if last is not None and now - last < REVOKED_USE_LOG_INTERVAL_SECONDS:
            return
        self._revoked_use_logged_at[record.id] = now
        logger.info(
            "rejected revoked token token_id=%s name=%s request_id=%s remote=%s",
            record.id,
            record.name,
            request_id_of(request),
            request.remote,
        )


AUTHENTICATOR_KEY = web.AppKey("authenticator", Authenticator)


def setup_auth(app: web.Application, settings: Settings) -> None:
    """Give `app` the Authenticator for the token file in `settings.data_dir`.

    Call it before the app starts. The Authenticator is made in dev mode too, where
    `check_token` does not use it, so the caller needs no branch.
    """
    store = TokenStore(token_file_path(settings.data_dir))
    store.refresh()
    app[AUTHENTICATOR_KEY] = Authenticator(store)


def is_open_route(request: web.Request) -> bool:
    """Return whether the request may pass without a bearer token.

    The check uses the path of the route that matched, not the request path, so a
    request that matches no route (a 404 or 405) needs a token even under `/internal/`.
    """
    resource = request.match_info.route.resource
    if resource is None:
        return False
    if resource.canonical.startswith(INTERNAL_PATH_PREFIX) or resource.canonical.startswith(PROXY_PREFIX):
        return True
    return request.method in OPEN_METHODS and resource.canonical in OPEN_PATHS


def required_scope(method: str) -> Scope:
    """Return the scope a request with this HTTP method needs."""
    return Scope.READ if method in READ_METHODS else Scope.WRITE


def check_token(request: web.Request) -> None:
    """Check the bearer token and its scope, unless dev mode is on or the route is open.

    It runs as a check of the API middleware (`build_api_middleware` in
    `voxanode.api.middlewares`), which renders the 401 and 403 ApiErrors as envelopes.
    """
    if request.app[NODE_KEY].settings.dev or is_open_route(request):
        return

    authenticator = request.app.get(AUTHENTICATOR_KEY)
    if authenticator is None:
        # Failing closed: without the token store no request can be checked.
        raise RuntimeError(
            "the API app has no Authenticator; call setup_auth(app, settings) in create_app"
        )
    record = authenticator.authenticate(request)

    needed = required_scope(request.method)
    if not record.scope.allows(needed):
        logger.debug(
            "rejected token scope token_id=%s scope=%s needed=%s request_id=%s",
            record.id,
            record.scope,
            needed,
            request_id_of(request),
        )
        raise _forbidden(request, record, needed)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "authenticated token_id=%s scope=%s request_id=%s",
            record.id,
            record.scope,
            request_id_of(request),
        )


def _bearer_token(request: web.Request) -> str:
    """Return the token of the Authorization header, or raise a 401 ApiError.

    A websocket upgrade without the header takes the token from `access_token`.
    """
    header = request.headers.get("Authorization")
    if header is None and _is_websocket_upgrade(request):
        query_token = request.query.get(WEBSOCKET_TOKEN_PARAMETER)
        if query_token is not None:
            header = f"{BEARER_SCHEME} {query_token}"
    if header is None:
        raise _unauthenticated(
            f"this route needs an Authorization: Bearer token; {CREATE_TOKEN_HINT}"
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != BEARER_SCHEME:
        raise _unauthenticated(
            f"this route needs an Authorization header with the Bearer scheme; {CREATE_TOKEN_HINT}"
        )
    token = token.strip()
    if not is_well_formed_token(token):
        raise _unauthenticated(
            "the bearer token is malformed: a token is voxa_ and 43 URL-safe base64 characters,"
            " as printed by `voxanode token create`",
            invalid=True,
        )
    return token


def _is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").strip().lower() == "websocket"
    )


def _unauthenticated(message: str, *, invalid: bool = False) -> ApiError:
    """Build the 401 error. `invalid` marks that a token was sent but is not accepted."""
    challenge = f'Bearer realm="{AUTH_REALM}"'
    if invalid:
        challenge += ', error="invalid_token"'
    return ApiError(
        401,
        ErrorCode.AUTHENTICATION_REQUIRED,
        message,
        headers={"WWW-Authenticate": challenge},
    )


def _forbidden(request: web.Request, record: TokenRecord, needed: Scope) -> ApiError:
    return ApiError(
        403,
        ErrorCode.AUTHORIZATION_FAILED,
        f"{request.method} {request.path} needs a token of scope {needed} or higher, but token"
        f" {record.id} has scope {record.scope}; create one with"
        f" `voxanode token create --scope {needed} --name NAME`",
        {"required_scope": str(needed), "token_scope": str(record.scope), "token_id": record.id},
    )
