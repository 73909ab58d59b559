"""The outbound address guard.

No test here opens a connection to a link-local or metadata address. The addresses come
from a stub resolver or a literal URL, and the guard rejects them before connecting.
Should the guard let one through, `guard_tripwire` fails the test before any connection.
"""

from __future__ import annotations

import email.utils

import pytest

from bot.config import ConfigError, Settings
from bot.net.guard import GuardedResolver, OutboundAddressRefused, OutboundPolicy
from bot.net.http import (
    TRUNCATION_MARKER,
    backoff_delay_s,
    excerpt,
    make_session,
    parse_retry_after,
    rate_limit_wait_s,
)
from tests.fakes.target import FakeTarget, Reply, StubResolver, guard_tripwire

METADATA_NAMES = {
    "metadata.test": ["169.254.169.254"],
    "metadata6.test": ["fd00:ec2::254"],
    "linklocal6.test": ["fe80::1"],
    "mapped.test": ["::ffff:169.254.169.254"],
    "mixed.test": ["127.0.0.1", "169.254.169.254"],
    "local.test": ["127.0.0.1"],
    "compat.test": ["::a9fe:a9fe"],
    "nat64.test": ["64:ff9b::169.254.169.254"],
    "sixtofour.test": ["2002:a9fe:a9fe::1"],
}

# IPv6 addresses that carry a link-local IPv4 address: (case, address).
EMBEDDED_LINK_LOCAL = [
    ("ipv4-compatible hex", "::a9fe:a9fe"),
    ("ipv4-compatible dotted", "::169.254.169.254"),
    ("nat64", "64:ff9b::a9fe:a9fe"),
    ("nat64 dotted", "64:ff9b::169.254.0.1"),
    ("6to4", "2002:a9fe:a9fe::1"),
    ("teredo client", "2001:0:4136:e378:8000:63bf:5601:5601"),
]


@pytest.fixture
def stub() -> StubResolver:
    return StubResolver(dict(METADATA_NAMES))


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "169.254.0.1", "fd00:ec2::254", "fe80::1", "fe80::1%eth0"]
)
def test_policy_rejects_default_ranges(address: str) -> None:
    with pytest.raises(OutboundAddressRefused):
        OutboundPolicy.from_lists().check_address("host.test", address)


def test_policy_rejects_ipv4_mapped_metadata() -> None:
    with pytest.raises(OutboundAddressRefused):
        OutboundPolicy.from_lists().check_address("host.test", "::ffff:169.254.169.254")


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.0.2.10", "2001:db8::1"])
def test_policy_allows_ordinary_addresses(address: str) -> None:
    OutboundPolicy.from_lists().check_address("host.test", address)


@pytest.mark.parametrize(
    "address",
    [case[1] for case in EMBEDDED_LINK_LOCAL],
    ids=[case[0] for case in EMBEDDED_LINK_LOCAL],
)
def test_policy_rejects_embedded_link_local(address: str) -> None:
    with pytest.raises(OutboundAddressRefused) as caught:
        OutboundPolicy.from_lists().check_address("host.test", address)
    assert "carries the IPv4 address 169.254." in str(caught.value)


@pytest.mark.parametrize(
    "address", ["::1", "64:ff9b::a00:1", "2002:c000:20a::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"]
)
def test_policy_allows_embedded_ordinary(address: str) -> None:
    OutboundPolicy.from_lists().check_address("host.test", address)


def test_policy_allow_covers_embedded_address() -> None:
    policy = OutboundPolicy.from_lists(allow=["169.254.10.0/24"])
    policy.check_address("host.test", "64:ff9b::169.254.10.5")
    with pytest.raises(OutboundAddressRefused):
        policy.check_address("host.test", "64:ff9b::169.254.169.254")


def test_policy_deny_covers_embedded_address() -> None:
    policy = OutboundPolicy.from_lists(deny=["10.0.0.0/8"])
    with pytest.raises(OutboundAddressRefused) as caught:
        policy.check_address("host.test", "2002:a00:1::1")
    assert "KUBECI_OUTBOUND_DENY" in str(caught.value)


def test_policy_message_names_host_address_setting() -> None:
    with pytest.raises(OutboundAddressRefused) as caught:
        OutboundPolicy.from_lists().check_address("metadata.test", "169.254.169.254")
    message = str(caught.value)
    assert "metadata.test" in message
    assert "169.254.169.254" in message
    assert "KUBECI_OUTBOUND_ALLOW" in message


def test_policy_allow_cidr_overrides_default() -> None:
    policy = OutboundPolicy.from_lists(allow=["169.254.10.0/24"])
    policy.check_address("host.test", "169.254.10.5")
    with pytest.raises(OutboundAddressRefused):
        policy.check_address("host.test", "169.254.169.254")


def test_policy_allow_host_overrides_default() -> None:
    policy = OutboundPolicy.from_lists(allow=["link.internal.test"])
    policy.check_address("link.internal.test", "169.254.3.4")
    with pytest.raises(OutboundAddressRefused):
        policy.check_address("other.test", "169.254.3.4")


def test_policy_deny_cidr_adds_refusal() -> None:
    policy = OutboundPolicy.from_lists(deny=["10.0.0.0/8"])
    with pytest.raises(OutboundAddressRefused) as caught:
        policy.check_address("host.test", "10.9.9.9")
    assert "KUBECI_OUTBOUND_DENY" in str(caught.value)


def test_policy_deny_mapped_cidr_matches_ipv4() -> None:
    policy = OutboundPolicy.from_lists(deny=["::ffff:10.0.0.0/104"])
    with pytest.raises(OutboundAddressRefused):
        policy.check_address("host.test", "10.9.9.9")


def test_policy_deny_host_and_wildcard() -> None:
    policy = OutboundPolicy.from_lists(deny=["blocked.test", "*.internal.test"])
    with pytest.raises(OutboundAddressRefused):
        policy.check_host("BLOCKED.test.")
    with pytest.raises(OutboundAddressRefused):
        policy.check_host("api.internal.test")
    policy.check_host("internal.test")


def test_policy_deny_wins_over_allow() -> None:
    policy = OutboundPolicy.from_lists(allow=["169.254.0.0/16"], deny=["169.254.169.254"])
    with pytest.raises(OutboundAddressRefused):
        policy.check_address("host.test", "169.254.169.254")


def test_policy_invalid_cidr_is_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        OutboundPolicy.from_lists(deny=["10.0.0.0/33"])
    assert "10.0.0.0/33" in str(caught.value)


@pytest.mark.parametrize(
    "host", ["metadata.test", "metadata6.test", "linklocal6.test", "compat.test", "nat64.test"]
)
async def test_resolver_rejects_metadata_answers(stub: StubResolver, host: str) -> None:
    resolver = GuardedResolver(stub, OutboundPolicy.from_lists())
    with pytest.raises(OutboundAddressRefused) as caught:
        await resolver.resolve(host, 80)
    assert caught.value.host == host


async def test_resolver_rejects_mapped_answer(stub: StubResolver) -> None:
    resolver = GuardedResolver(stub, OutboundPolicy.from_lists())
    with pytest.raises(OutboundAddressRefused):
        await resolver.resolve("mapped.test", 80)


async def test_resolver_rejects_if_any_answer_refused(stub: StubResolver) -> None:
    resolver = GuardedResolver(stub, OutboundPolicy.from_lists())
    with pytest.raises(OutboundAddressRefused) as caught:
        await resolver.resolve("mixed.test", 80)
    assert caught.value.address == "169.254.169.254"


async def test_resolver_denied_name_not_looked_up(stub: StubResolver) -> None:
    resolver = GuardedResolver(stub, OutboundPolicy.from_lists(deny=["local.test"]))
    with pytest.raises(OutboundAddressRefused):
        await resolver.resolve("local.test", 80)
    assert stub.asked == []


async def test_resolver_passes_allowed_answers(stub: StubResolver) -> None:
    resolver = GuardedResolver(stub, OutboundPolicy.from_lists())
    results = await resolver.resolve("local.test", 80)
    assert [result["host"] for result in results] == ["127.0.0.1"]


@pytest.mark.parametrize(
    "host", ["metadata.test", "metadata6.test", "linklocal6.test", "sixtofour.test"]
)
async def test_session_rejects_resolved_metadata(stub: StubResolver, host: str) -> None:
    session = make_session(Settings(), resolver=stub, trace_configs=[guard_tripwire(stub)])
    async with session:
        with pytest.raises(OutboundAddressRefused):
            await session.get(f"http://{host}/latest/meta-data/")
    assert stub.asked == [host]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[fe80::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::a9fe:a9fe]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2002:a9fe:a9fe::1]/",
    ],
)
async def test_session_rejects_literal_metadata_ip(stub: StubResolver, url: str) -> None:
    session = make_session(Settings(), resolver=stub, trace_configs=[guard_tripwire(stub)])
    async with session:
        with pytest.raises(OutboundAddressRefused):
            await session.get(url)


async def test_session_reaches_local_target(stub: StubResolver, fake_target: FakeTarget) -> None:
    session = make_session(Settings(), resolver=stub, trace_configs=[guard_tripwire(stub)])
    async with session, session.get(fake_target.url("/ping")) as response:
        assert response.status == 200
    assert len(fake_target.received("/ping")) == 1


async def test_session_deny_rejects_local_target(
    stub: StubResolver, fake_target: FakeTarget
) -> None:
    settings = Settings(outbound_deny=("127.0.0.0/8",))
    session = make_session(settings, resolver=stub, trace_configs=[guard_tripwire(stub)])
    async with session:
        with pytest.raises(OutboundAddressRefused):
            await session.get(fake_target.url("/ping"))
    assert fake_target.received() == []


@pytest.mark.parametrize(
    "location", ["http://metadata.test/latest/meta-data/", "http://169.254.169.254/latest/"]
)
async def test_redirect_to_metadata_stopped(
    stub: StubResolver, fake_target: FakeTarget, location: str
) -> None:
    fake_target.script("/hop", Reply(status=302, headers={"Location": location}))
    session = make_session(Settings(), resolver=stub, trace_configs=[guard_tripwire(stub)])
    async with session:
        with pytest.raises(OutboundAddressRefused):
            await session.post(fake_target.url("/hop"), data=b"{}")
    assert len(fake_target.received("/hop")) == 1


async def test_redirect_to_local_name_followed(stub: StubResolver, fake_target: FakeTarget) -> None:
    port = fake_target.base_url.rsplit(":", 1)[1]
    fake_target.script(
        "/hop", Reply(status=307, headers={"Location": f"http://local.test:{port}/end"})
    )
    session = make_session(Settings(), resolver=stub, trace_configs=[guard_tripwire(stub)])
    async with session, session.get(fake_target.url("/hop")) as response:
        assert response.status == 200
    assert [request.path for request in fake_target.received()] == ["/hop", "/end"]


# The HTTP helpers of bot.net.http, which every outbound caller shares with the guard.


def test_retry_after_seconds() -> None:
    assert parse_retry_after({"retry-after": "120"}) == 120.0


def test_retry_after_http_date() -> None:
    now_s = 1_700_000_000.0
    header = {"Retry-After": email.utils.formatdate(now_s + 90, usegmt=True)}
    assert parse_retry_after(header, now_s=now_s) == 90.0


def test_retry_after_past_date_is_zero() -> None:
    header = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    assert parse_retry_after(header) == 0.0


@pytest.mark.parametrize("value", ["soon", "", "nan", "inf"])
def test_retry_after_unreadable_is_none(value: str) -> None:
    assert parse_retry_after({"Retry-After": value}) is None


def test_rate_limit_reset_when_exhausted() -> None:
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1000060"}
    assert rate_limit_wait_s(headers, now_s=1_000_000.0) == 60.0


def test_rate_limit_reset_ignored_with_quota_left() -> None:
    headers = {"X-RateLimit-Remaining": "12", "X-RateLimit-Reset": "1000060"}
    assert rate_limit_wait_s(headers, now_s=1_000_000.0) is None


def test_rate_limit_longest_wait_wins() -> None:
    headers = {"Retry-After": "5", "RateLimit-Remaining": "0", "RateLimit-Reset": "1000030"}
    assert rate_limit_wait_s(headers, now_s=1_000_000.0) == 30.0


def test_backoff_without_jitter_grows_and_caps() -> None:
    delays = [backoff_delay_s(attempt, 1.0, 2.0, 10.0, jitter=False) for attempt in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_jitter_between_half_and_whole() -> None:
    for _ in range(200):
        assert 4.0 <= backoff_delay_s(3, 2.0, 2.0, 60.0) <= 8.0


def test_backoff_huge_attempt_capped() -> None:
    assert backoff_delay_s(100_000, 1.0, 2.0, 30.0, jitter=False) == 30.0


def test_excerpt_short_text_unchanged() -> None:
    assert excerpt("short", 100) == "short"


def test_excerpt_never_splits_character() -> None:
    text = excerpt("ab" + "€" * 100, 40)
    assert len(text.encode("utf-8")) <= 40
    assert text.endswith(TRUNCATION_MARKER)
    assert "\ufffd" not in text


def test_excerpt_invalid_bytes_replaced() -> None:
    assert excerpt(b"ok \xff\xfe", 100) == "ok \ufffd\ufffd"


def test_excerpt_binary_body_stays_bounded() -> None:
    assert len(excerpt(b"\xff" * 1000, 64).encode("utf-8")) <= 64
