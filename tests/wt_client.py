"""The WebTransport test client now lives in testkit (bench uses it too); re-exported here
so that test modules keep importing it from tests.wt_client."""

from __future__ import annotations

from testkit.wt_client import WTClient as WTClient
from testkit.wt_client import client_configuration as client_configuration
from testkit.wt_client import wt_connect as wt_connect
