import json, pickle
from playbook_runner import run_playbook

def test_scratch(make_db):
    db = make_db(seed_calls=3000)
    r = run_playbook(db, "phase1")
    open("/tmp/scratch_res.txt","w").write(r.text + "\n\nRAW\n" + r.stdout)
    r2 = run_playbook(db, "phase1")
    open("/tmp/scratch_res2.txt","w").write(r2.text)
    print(r.duration, r2.duration)
    assert r.ok
