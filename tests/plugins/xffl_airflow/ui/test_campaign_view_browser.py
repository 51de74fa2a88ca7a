"""The federation DAG in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium; nothing downloaded) logs into the session's real
api-server.

- The campaign view: opens the federation DAG, follows its "Campaign" tab to the view of a
  finished 2-round campaign run on the local facilities, and checks what a person would see.
- The release approval: that campaign's config asks a person to approve each release; the
  browser opens the release run's "Required actions" form, which shows the comparison (the
  best round, the losses per facility, the bytes moved), and clicks "Reject": nothing is
  released, the refusal is recorded, and the campaign view says "not released".
- The trigger form: a first-time user opens a federation DAG, clicks "Trigger", and submits the
  form as it opens (campaign empty, the config's values pre-filled); one run starts, with the
  conf the form sent, and ends in success (round 0 of the config's campaign).

Starts: the session's ``testbed`` and ``airflow_instance`` (see tests/conftest.py); for the
campaign view, restarts that instance's api-server once with ``XFFL_FEDERATION_CONFIG`` naming
that test's config (the view only reads the storage of configs the deployment names); one
chromium per test, quit at its end. Each test's DAG file is removed at its end, and the test
waits until the dag-processor reports no import error for it. Screenshots are saved in the
test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from xffl_airflow.federation.config import load_config

from tests.plugins.xffl_airflow.federation.campaign_support import run_campaign, ti_states
from tests.plugins.xffl_airflow.federation.conftest import corpora, storage, tiny  # noqa: F401
from tests.plugins.xffl_airflow.hooks.slurm_support import wait_until
from xffl_testbed.airflow_instance import AirflowError
from xffl_testbed.campaign import (
    LocalFacility,
    install_federation_dag,
    wait_for_campaign,
    wait_for_release,
    write_config,
)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CAMPAIGN = "viewed"
FORMED = "formed"  # the campaign of the trigger-form test


@pytest.fixture
def browser(monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(
                f"{path} is missing: `make setup` installs Debian's chromium and chromium-driver"
            )
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1500,1100",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dag_files(airflow_instance):
    """The (DAG file, DAG id) pairs a test installs (it appends them): removed at its end, and
    waited for until the dag-processor has taken their removal in."""
    files: list[tuple[Path, str]] = []
    yield files
    for dag_file, dag_id in files:
        airflow_instance.remove_dag_file(dag_file, dag_id)


def keep_screenshots(shots: Path, name: str) -> None:
    """Copies the screenshots where CI keeps them, when it asks (XFFL_SCREENSHOTS)."""
    kept = os.environ.get("XFFL_SCREENSHOTS")
    if kept:
        shutil.copytree(shots, Path(kept) / name, dirs_exist_ok=True)


def restart_api_server_with_config(airflow, config: Path) -> None:
    """The api-server reads XFFL_FEDERATION_CONFIG; the session's started without one."""
    saved = dict(airflow.env)
    airflow.env["XFFL_FEDERATION_CONFIG"] = str(config)
    try:
        airflow.stop_component("api-server")
        airflow.start_component("api-server")
        airflow.wait_until_healthy(timeout=180)
    finally:
        airflow.env.clear()
        airflow.env.update(saved)  # components started later get the session's environment


def login(driver, wait, airflow) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver.get(airflow.base_url + "/")
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys(airflow.username)
    driver.find_element(By.NAME, "password").send_keys(airflow.password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: "/auth/login" not in d.current_url and d.get_cookie("_token"))


def open_tab_frame(driver, wait, page_url: str, route: str):
    """Opens an Airflow UI page, clicks the plugin tab ``route`` and enters its iframe."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver.get(page_url)
    tab = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"a[href$='plugin/{route}']")))
    tab.click()
    wait.until(ec.frame_to_be_available_and_switch_to_it((By.CSS_SELECTOR, "iframe")))
    wait.until(ec.presence_of_element_located((By.ID, "verification")))


def cell(driver, round_number: int, facility: str, column: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(
        By.CSS_SELECTOR,
        f"#facilities tr[data-round='{round_number}'][data-facility='{facility}'] td[data-col='{column}']",
    ).text


def test_a_person_reads_a_finished_campaign_in_the_ui(
    airflow_instance,
    testbed,
    corpora,  # noqa: F811
    tiny,  # noqa: F811
    storage,  # noqa: F811
    browser,
    dag_files,
    tmp_path,
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    airflow = airflow_instance
    restart_api_server_with_config(airflow, storage / f"{CAMPAIGN}.yaml")  # written just below
    # run_campaign installs this DAG file
    dag_files.append(
        (Path(airflow.dags_folder) / f"xffl_federation_{CAMPAIGN}.py", f"xffl_{CAMPAIGN}")
    )
    dag_id = run_campaign(
        airflow, testbed, corpora, tiny, storage, campaign=CAMPAIGN,
        convergence={"max_rounds": 2}, training={"max_steps": 8, "learning_rate": 0.003, "threads": 1, "seed": 0},
        release={"approval": True},
    )  # fmt: skip
    runs = wait_for_campaign(airflow, dag_id, CAMPAIGN, storage / CAMPAIGN, timeout=900)
    assert [r["state"] for r in runs] == ["success", "success"], runs
    wait = WebDriverWait(browser, 60)
    login(browser, wait, airflow)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    reject_the_release_in_the_form(browser, airflow, storage, shots)
    folder = storage / CAMPAIGN
    manifests = [
        json.loads((folder / f"round-{n:04d}" / "manifest.json").read_text()) for n in range(2)
    ]

    # nobody logged in gets nothing; a token of Airflow's own gets the page; no path escapes storage
    view = f"{airflow.base_url}/xffl/dags/{dag_id}/campaign"
    assert httpx.get(view, timeout=30).status_code == 401
    assert httpx.get(
        view, headers={"Authorization": "Bearer not-a-token"}, timeout=30
    ).status_code in (401, 403)
    bearer = {"Authorization": f"Bearer {airflow.token()}"}
    assert httpx.get(view, headers=bearer, timeout=30).status_code == 200
    for bad in ("..%2F..%2Fetc", "%2Fetc", "Viewed", "nosuch"):
        answer = httpx.get(
            f"{airflow.base_url}/xffl/dags/{dag_id}/campaigns/{bad}", headers=bearer, timeout=30
        )
        assert answer.status_code == 404, (bad, answer.status_code)
    assert httpx.get(
        f"{airflow.base_url}/xffl/dags/xffl_nosuch/campaign", headers=bearer, timeout=30
    ).status_code in (403, 404)

    # the DAG's page -> its "Campaign" tab
    open_tab_frame(browser, wait, f"{airflow.base_url}/dags/{dag_id}", "xffl-campaign")
    assert browser.find_element(By.ID, "campaign").text == CAMPAIGN
    assert browser.find_element(By.ID, "verification").text.startswith(
        "OK manifest chain: 2 round(s)"
    )
    for manifest in manifests:
        number = manifest["round"]
        for name, facility in manifest["facilities"].items():
            metrics, job = facility["metrics"], facility["job"]
            assert cell(browser, number, name, "status") == facility["status"] == "ok"
            assert cell(browser, number, name, "loss_before") == f"{metrics['val_loss_before']:.4f}"
            assert cell(browser, number, name, "loss_after") == f"{metrics['val_loss_after']:.4f}"
            assert cell(browser, number, name, "samples") == str(metrics["num_samples"])
            assert cell(browser, number, name, "weight") == f"{facility['weight']:.3f}"
            assert cell(browser, number, name, "queue_s") == f"{job['queue_wait_s']:.1f}"
            assert cell(browser, number, name, "run_s") == f"{job['run_s']:.1f}"
            assert cell(browser, number, name, "push_s") == f"{facility['push']['seconds']:.2f}"
            assert cell(browser, number, name, "pull_s") == f"{facility['pull']['seconds']:.2f}"
        assert (
            cell(browser, number, "(global)", "loss_before")
            == f"{manifest['weighted_val_loss']:.4f}"
        )
        assert (
            cell(browser, number, "(global)", "aggregation_s")
            == f"{manifest['aggregation']['seconds']:.2f}"
        )
        decision = browser.find_element(
            By.CSS_SELECTOR, f"#rounds tr[data-round='{number}'] td[data-col='decision']"
        )
        assert decision.text.startswith("stop" if manifest["decision"]["stop"] else "continue")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#facilities tbody tr")) == 2 * 3
    for chart in ("loss-chart", "timing-chart"):
        svg = browser.find_element(By.ID, chart)
        assert svg.size["width"] > 100 and svg.size["height"] > 100
    assert len(browser.find_elements(By.CSS_SELECTOR, "#loss-chart polyline.series")) == 3
    # the release the person rejected: the best round, and why nothing was released
    assert browser.find_element(By.ID, "released").text == f"not released (rejected by {airflow.username})"
    assert browser.find_element(By.ID, "best-round").text in ("0", "1")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timing-chart rect.bar")) >= 2 * 3
    browser.switch_to.default_content()
    browser.save_screenshot(str(shots / "dag-campaign-tab.png"))

    # a round's run page -> its "Campaign round" tab marks that round
    open_tab_frame(
        browser,
        wait,
        f"{airflow.base_url}/dags/{dag_id}/runs/{runs[1]['dag_run_id']}",
        "xffl-campaign-round",
    )
    marked = browser.find_elements(By.CSS_SELECTOR, "#facilities tr.highlight")
    assert marked and {row.get_attribute("data-round") for row in marked} == {"1"}
    browser.switch_to.default_content()
    browser.save_screenshot(str(shots / "run-campaign-tab.png"))

    # one byte of an old manifest changed: the view reads FAIL and names the broken link
    older = folder / "round-0000" / "manifest.json"
    data = bytearray(older.read_bytes())
    data[10] ^= 0x20
    older.write_bytes(bytes(data))
    open_tab_frame(browser, wait, f"{airflow.base_url}/dags/{dag_id}", "xffl-campaign")
    verdict = browser.find_element(By.ID, "verification").text
    problems = browser.find_element(By.ID, "verification-problems").text
    assert verdict.startswith("FAIL manifest chain"), verdict
    assert "round-0001/manifest.json" in problems and "round-0000/manifest.json" in problems, (
        problems
    )
    browser.switch_to.default_content()
    browser.save_screenshot(str(shots / "dag-campaign-tab-tampered.png"))
    keep_screenshots(shots, "campaign-view")
    assert all(p.stat().st_size > 5000 for p in shots.iterdir())


def reject_the_release_in_the_form(driver, airflow, folder: Path, shots: Path) -> None:
    """The release run's approval form, as a person sees it; "Reject" clicked: nothing released."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from xffl_airflow.federation.names import release_dag_id, release_run_id

    release_dag, release_run = release_dag_id(CAMPAIGN), release_run_id(CAMPAIGN)
    hitl = f"dags/{release_dag}/dagRuns/{release_run}/taskInstances/approve/-1/hitlDetails"

    def asked():
        try:
            return airflow.api("GET", hitl)
        except AirflowError as error:
            if " 404 " not in str(error):
                raise
            return None

    detail = wait_until(asked, timeout=600, every=2, what="the release run's approval form")
    assert detail["subject"].startswith(f"Release campaign {CAMPAIGN}, round ")
    form = WebDriverWait(driver, 90)
    driver.get(f"{airflow.base_url}/dags/{release_dag}/runs/{release_run}/tasks/approve/required_actions")
    form.until(lambda d: "loss of the last global model" in d.find_element(By.TAG_NAME, "body").text)
    page = driver.find_element(By.TAG_NAME, "body").text
    assert detail["subject"] in page and "no previous release" in page, page[-3000:]
    assert "site1" in page and "site2" in page and "MB moved" in page, page[-3000:]
    driver.save_screenshot(str(shots / "release-approval-form.png"))
    reject = form.until(lambda d: [b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Reject"])
    reject[0].click()
    release = wait_for_release(airflow, CAMPAIGN, CAMPAIGN, timeout=300)
    assert release["state"] == "success", release
    states = ti_states(airflow, release_dag, release_run)
    assert states["approve"]["state"] == "success" and states["publish"]["state"] == "skipped", states
    record = json.loads((folder / CAMPAIGN / "release" / "approval.json").read_text())
    assert record["approved"] is False and record["chosen_options"] == ["Reject"], record
    assert not list((folder / "_releases" / CAMPAIGN).glob("[0-9]*"))


def shown_as(value) -> str:
    """How the trigger form shows a parameter's default: '' for none, numbers without a dot if whole."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_a_first_time_user_triggers_a_round_with_the_form_as_it_opens(
    airflow_instance,
    testbed,
    corpora,  # noqa: F811
    tiny,  # noqa: F811
    storage,  # noqa: F811
    browser,
    dag_files,
    tmp_path,
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    airflow = airflow_instance
    site1, site2 = testbed.facilities
    config = write_config(
        storage / f"{FORMED}.yaml", campaign=FORMED, storage=storage, base_model=tiny / "model", python=site1.python,
        facilities=[LocalFacility(site1, corpora[site1.name]), LocalFacility(site2, corpora[site2.name])],
        training={"max_steps": 8, "learning_rate": 0.003, "threads": 1, "seed": 0}, convergence={"max_rounds": 1},
    )  # fmt: skip
    dag_id = f"xffl_{FORMED}"
    dag_files.append((install_federation_dag(airflow.dags_folder, config, name=FORMED), dag_id))
    airflow.wait_for_dag(dag_id, timeout=180)
    assert airflow.dag_runs(dag_id) == []
    # what the form must send untouched: no campaign (the config's), round 0, the config's knob values
    expected = {"campaign": None, "round": 0, **load_config(str(config)).knob_defaults()}
    assert {"learning_rate", "max_steps", "max_rounds"} <= set(expected)  # opened by default

    wait = WebDriverWait(browser, 60)
    login(browser, wait, airflow)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # the DAG's page -> "Trigger": the form opens with its defaults, submittable as it is
    browser.get(f"{airflow.base_url}/dags/{dag_id}")
    trigger = (By.XPATH, "//button[normalize-space()='Trigger']")
    wait.until(ec.element_to_be_clickable(trigger)).click()
    modal = (By.CSS_SELECTOR, "[role=dialog][aria-modal=true]")
    dialog = wait.until(ec.visibility_of_element_located(modal))
    # the form shows "Loading Dag information..." until the DAG's params have come
    wait.until(lambda _: dialog.find_elements(By.NAME, "element_round"))
    assert f"Trigger Dag - {dag_id}" in dialog.text
    fields = {
        field.get_attribute("name").removeprefix("element_"): field
        for field in dialog.find_elements(By.CSS_SELECTOR, "input[name^='element_']")
    }
    assert set(fields) == set(expected), sorted(fields)
    shown = {name: field.get_attribute("value") for name, field in fields.items()}
    assert shown == {name: shown_as(value) for name, value in expected.items()}, shown
    assert dialog.find_elements(By.CSS_SELECTOR, "[aria-invalid=true]") == []
    submit = dialog.find_element(By.XPATH, ".//button[normalize-space()='Trigger']")
    assert submit.is_enabled() and submit.get_attribute("disabled") is None
    browser.save_screenshot(str(shots / "trigger-form.png"))

    submit.click()
    # the UI goes to the new run's page; the API has exactly that one run, with the form's conf
    wait.until(lambda d: "/runs/" in d.current_url)
    runs = wait_until(lambda: airflow.dag_runs(dag_id), timeout=60, every=1, what="the form's run")
    assert len(runs) == 1, runs
    run = runs[0]
    assert unquote(browser.current_url.rsplit("/runs/", 1)[1]) == run["dag_run_id"]
    who = (run["run_type"], run["triggered_by"], run["triggering_user_name"])
    assert who == ("manual", "ui", airflow.username)
    assert run["conf"] == expected, run["conf"]

    state = airflow.wait_for_run(dag_id, run["dag_run_id"], timeout=600)
    tis = ti_states(airflow, dag_id, run["dag_run_id"])
    states = {task: ti["state"] for task, ti in tis.items()}
    assert state == "success", states
    assert states.pop("next_round") == "skipped"  # max_rounds 1: the campaign ends with this round
    assert set(states.values()) == {"success"}, states
    assert [r["dag_run_id"] for r in airflow.dag_runs(dag_id)] == [run["dag_run_id"]]
    manifest = json.loads((storage / FORMED / "round-0000" / "manifest.json").read_text())
    ran = (manifest["campaign"], manifest["round"], manifest["run_id"])
    assert ran == (FORMED, 0, run["dag_run_id"])  # round 0 of the config's campaign
    assert manifest["overrides"] == {}  # the form's values are the config's own
    assert manifest["decision"]["stop"] is True

    browser.get(f"{airflow.base_url}/dags/{dag_id}/runs/{run['dag_run_id']}")
    wait.until(ec.visibility_of_element_located((By.XPATH, "//*[normalize-space()='Success']")))
    browser.save_screenshot(str(shots / "triggered-run.png"))
    keep_screenshots(shots, "trigger-form")
    assert sorted(p.name for p in shots.iterdir()) == ["trigger-form.png", "triggered-run.png"]
    assert all(p.stat().st_size > 5000 for p in shots.iterdir())
