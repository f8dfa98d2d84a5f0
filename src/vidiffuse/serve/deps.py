"""Dependencies the routes share: settings, stores and the calling API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .settings import ServeSettings
from .store import ApiKey, Store

_bearer = HTTPBearer(auto_error=False, description="An API key from `vidiffuse keys create NAME`.")


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_keys(request: Request) -> Store:
    return request.app.state.keys


def get_jobs(request: Request):
    return request.app.state.jobs


def current_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                keys: Annotated[Store, Depends(get_keys)]) -> ApiKey:
    key = keys.authenticate(credentials.credentials) if credentials else None
    if key is None:
        raise HTTPException(401, "a valid API key is required: Authorization: Bearer KEY",
                            headers={"WWW-Authenticate": "Bearer"})
    return key


SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
JobsDep = Annotated[Store, Depends(get_jobs)]
KeyDep = Annotated[ApiKey, Depends(current_key)]
