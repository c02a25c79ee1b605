"""The status page in a real browser: Debian's chromium driven by selenium through chromium-driver,
against a real nsinitd. Selenium is given both binaries, so Selenium Manager never looks for (or
downloads) a browser. With NSINIT_SCREENSHOT=PATH the test also writes the page's screenshot there
(docs/web-status.png is made that way)."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import make_busybox_rootfs
from tests.supervisor.test_web import TOKEN, Web, web  # noqa: F401 (web is the fixture)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install, see .ci/run)")

PROGRAMS = """
    [programs.web]
    command = ["sleep", "300"]
    startsecs = 0.2
    [programs.worker]
    command = ["sleep", "300"]
    startsecs = 0.2
    [programs.crasher]
    command = ["sleep", "300"]
    startsecs = 0.2
    autorestart = "never"
"""

DOM_WAIT = 10.0  # seconds a condition on the page may take to come true


def chromium(profile: Path, scripts: bool = True) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1100,460", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if not scripts:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    driver = chromium(tmp_path / "chromium")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser_without_scripts(tmp_path: Path) -> Iterator[WebDriver]:
    driver = chromium(tmp_path / "chromium-noscript", scripts=False)
    try:
        yield driver
    finally:
        driver.quit()


def row(driver: WebDriver, name: str) -> Any:
    return driver.find_element(By.ID, f"p-{name}")


def wait_until(driver: WebDriver, condition: Callable[[WebDriver], object], what: str) -> None:
    WebDriverWait(driver, DOM_WAIT).until(condition, message=f"the page never showed {what}")


def click(driver: WebDriver, name: str, action: str) -> None:
    row(driver, name).find_element(By.XPATH, f".//button[text()='{action}']").click()


async def in_browser(fn: Callable[[], object]) -> None:
    """Selenium blocks: it runs in a thread while nsinitd's events are read in this one."""
    await trio.to_thread.run_sync(fn)


async def test_the_page_stops_a_program_and_shows_a_crash_live_and_a_refusal(
        web: Callable[..., Awaitable[Web]], browser: WebDriver) -> None:  # noqa: F811 (the fixture)
    w = await web(programs=PROGRAMS)
    await w.daemon.wait_for("program.running", "crasher")
    url = f"http://127.0.0.1:{w.port}/"

    def loads_and_lists_every_program() -> None:
        browser.get(url)
        for name in ("crasher", "web", "worker"):
            assert row(browser, name).get_attribute("class") == "RUNNING"
            assert row(browser, name).find_element(By.CLASS_NAME, "state").text == "RUNNING"
        wait_until(browser, lambda d: d.find_element(By.ID, "programs").get_attribute("data-live") == "yes",
                   "the event stream open")
        # a mark that a reload would wipe: the rows below change without one
        browser.execute_script("window.notReloaded = true;")

    await in_browser(loads_and_lists_every_program)

    def a_stop_without_the_token_is_refused_on_the_page() -> None:
        click(browser, "web", "stop")
        wait_until(browser, lambda d: d.find_element(By.ID, "msg").text != "", "the refusal")
        assert browser.find_element(By.ID, "msg").text == (
            "permission denied: the token is missing (Authorization: Bearer, or the page's token field)")

    await in_browser(a_stop_without_the_token_is_refused_on_the_page)
    refused = await w.daemon.wait_for("web.refused")
    assert (refused["path"], refused["reason"]) == ("/program/web/stop", "no-token")
    assert await w.state("web") == "RUNNING"

    def a_stop_with_the_token_stops_it_and_the_row_follows() -> None:
        browser.find_element(By.NAME, "token").send_keys(TOKEN)
        click(browser, "web", "stop")
        wait_until(browser, lambda d: row(d, "web").get_attribute("class") == "STOPPED", "web STOPPED")
        assert row(browser, "web").find_element(By.CLASS_NAME, "state").text == "STOPPED"
        assert browser.find_element(By.ID, "msg").text == ""
        assert browser.execute_script("return window.notReloaded") is True

    await in_browser(a_stop_with_the_token_stops_it_and_the_row_follows)
    await w.daemon.wait_for("program.stopped", "web")
    assert await w.state("web") == "STOPPED"

    crasher = (await w.request("GET", "/status.json")).json()
    os.kill(next(p["pid"] for p in crasher if p["name"] == "crasher"), signal.SIGKILL)
    await w.daemon.wait_for("program.exited", "crasher")

    def the_crash_turns_its_row_red() -> None:
        wait_until(browser, lambda d: row(d, "crasher").get_attribute("class") == "EXITED", "crasher EXITED")
        assert row(browser, "crasher").value_of_css_property("background-color") == "rgba(255, 221, 221, 1)"
        assert row(browser, "crasher").find_element(By.CLASS_NAME, "exit").text == "SIGKILL"
        assert row(browser, "worker").get_attribute("class") == "RUNNING"
        assert browser.execute_script("return window.notReloaded") is True
        # the token stays in this tab: a reload keeps it in the field
        browser.refresh()
        assert browser.find_element(By.NAME, "token").get_attribute("value") == TOKEN
        if os.environ.get("NSINIT_SCREENSHOT"):
            browser.save_screenshot(os.environ["NSINIT_SCREENSHOT"])

    await in_browser(the_crash_turns_its_row_red)

    def signal_all_with_kill_restarts_the_one_running_program() -> None:
        Select(browser.find_element(By.NAME, "signal")).select_by_visible_text("KILL")
        browser.find_element(By.XPATH, "//button[text()='signal all']").click()
        wait_until(browser, lambda d: row(d, "worker").find_element(By.CLASS_NAME, "restarts").text == "1"
                   and row(d, "worker").get_attribute("class") == "RUNNING", "worker restarted")
        assert row(browser, "worker").find_element(By.CLASS_NAME, "exit").text == "SIGKILL"
        assert browser.find_element(By.ID, "msg").text == ""
        assert [row(browser, name).get_attribute("class") for name in ("crasher", "web")] == ["EXITED", "STOPPED"]

    await in_browser(signal_all_with_kill_restarts_the_one_running_program)
    killed = await w.daemon.wait_for("program.exited", "worker")
    assert killed["signal"] == "SIGKILL"
    # web's exit is the stop; only the one RUNNING program was signalled
    assert [e["program"] for e in w.daemon.events if e["event"] == "program.exited"] == ["web", "crasher", "worker"]


async def test_a_program_page_shows_new_output_lines_without_a_reload(
        web: Callable[..., Awaitable[Web]], browser: WebDriver, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    fifo = tmp_path / "say"
    os.mkfifo(fifo)
    w = await web(auth="none", programs=f"""
        [programs.talker]
        command = ["sh", "-c", "echo before; exec cat {fifo}"]
        startsecs = 0.2
    """)
    await w.daemon.wait_for("program.running", "talker")

    def loads_and_follows() -> None:
        browser.get(f"http://127.0.0.1:{w.port}/program/talker")
        browser.execute_script("window.notReloaded = true;")
        wait_until(browser, lambda d: d.find_element(By.ID, "log-stdout").get_attribute("data-following") == "yes",
                   "the log followed")

    await in_browser(loads_and_follows)
    writer = await trio.to_thread.run_sync(lambda: open(fifo, "w"))  # noqa: SIM115 - closed below
    with writer:
        writer.write("a new <line>\n")

    def the_line_appears() -> None:
        wait_until(browser, lambda d: "a new <line>" in d.find_element(By.ID, "log-stdout").text, "the new line")
        assert browser.find_element(By.ID, "log-stdout").text.endswith("a new <line>")
        assert browser.execute_script("return window.notReloaded") is True

    await in_browser(the_line_appears)


async def test_without_scripts_the_page_is_a_table_whose_buttons_still_act(
        web: Callable[..., Awaitable[Web]], browser_without_scripts: WebDriver) -> None:  # noqa: F811 (the fixture)
    b = browser_without_scripts
    w = await web(programs=PROGRAMS)
    await w.daemon.wait_for("program.running", "crasher")

    def a_stop_without_the_token_answers_a_page_saying_why() -> None:
        b.get(f"http://127.0.0.1:{w.port}/")
        assert b.find_element(By.ID, "programs").get_attribute("data-live") is None  # its script didn't run
        assert [row(b, name).get_attribute("class") for name in ("crasher", "web", "worker")] == ["RUNNING"] * 3
        click(b, "web", "stop")
        assert b.find_element(By.CLASS_NAME, "err").text == (
            "permission denied: the token is missing (Authorization: Bearer, or the page's token field)")

    await in_browser(a_stop_without_the_token_answers_a_page_saying_why)
    assert (await w.daemon.wait_for("web.refused"))["reason"] == "no-token"

    def with_the_token_the_form_stops_it_and_comes_back_to_the_table() -> None:
        b.get(f"http://127.0.0.1:{w.port}/")
        b.find_element(By.NAME, "token").send_keys(TOKEN)
        click(b, "web", "stop")
        assert b.current_url == f"http://127.0.0.1:{w.port}/"
        assert row(b, "web").get_attribute("class") == "STOPPED"
        b.find_element(By.NAME, "token").send_keys(TOKEN)
        Select(b.find_element(By.NAME, "signal")).select_by_visible_text("KILL")
        click(b, "crasher", "signal")
        assert b.current_url == f"http://127.0.0.1:{w.port}/"

    await in_browser(with_the_token_the_form_stops_it_and_comes_back_to_the_table)
    assert (await w.daemon.wait_for("program.exited", "crasher"))["signal"] == "SIGKILL"
    assert [await w.state(name) for name in ("web", "crasher")] == ["STOPPED", "EXITED"]


async def test_on_a_phone_the_table_fits_the_screen(
        web: Callable[..., Awaitable[Web]], browser: WebDriver) -> None:  # noqa: F811 (the fixture)
    w = await web(programs=PROGRAMS)

    def fits() -> None:
        browser.set_window_size(390, 844)  # a phone's screen, in CSS pixels
        browser.get(f"http://127.0.0.1:{w.port}/")
        width = browser.execute_script("return window.innerWidth")
        assert width <= 390
        # no sideways scrolling, of the page or of the table, to reach a program's buttons
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        wrap = browser.find_element(By.CLASS_NAME, "wrap")
        assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", wrap) is True
        assert row(browser, "web").find_element(By.CLASS_NAME, "pid").value_of_css_property("display") == "none"
        for action in ("start", "stop", "restart", "signal"):
            assert row(browser, "web").find_element(By.XPATH, f".//button[text()='{action}']").is_displayed()

    await in_browser(fits)


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_an_oom_kill_shows_in_its_row_live(
        web: Callable[..., Awaitable[Web]], browser: WebDriver, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    rootfs = make_busybox_rootfs(tmp_path / "bb", {"cgroups": {"memory": 16 << 20, "memory_swap": 16 << 20}})
    os.mkfifo(rootfs / "go")
    w = await web(auth="none", programs=f"""
        [programs.hog]
        container = "{rootfs}"
        command = ["sh", "-c", "read x < /go; exec tail /dev/zero"]
        startsecs = 0.2
        autorestart = "never"
    """)
    await w.daemon.wait_for("program.running", "hog", timeout=30)

    def loads() -> None:
        browser.get(f"http://127.0.0.1:{w.port}/")
        wait_until(browser, lambda d: d.find_element(By.ID, "programs").get_attribute("data-live") == "yes",
                   "the event stream open")
        browser.execute_script("window.notReloaded = true;")
        assert row(browser, "hog").get_attribute("class") == "RUNNING"

    await in_browser(loads)
    await trio.to_thread.run_sync(lambda: (rootfs / "go").write_text("now\n"))  # tail grows into the limit
    assert (await w.daemon.wait_for("program.exited", "hog", timeout=30))["oom_killed"] is True

    def the_row_says_oom() -> None:
        wait_until(browser, lambda d: row(d, "hog").get_attribute("class") == "EXITED", "hog EXITED")
        assert row(browser, "hog").find_element(By.CLASS_NAME, "exit").text == "SIGKILL (OOM)"
        assert browser.execute_script("return window.notReloaded") is True

    await in_browser(the_row_says_oom)
