import json, pickle
from playbook_runner import run_playbook

def prof(r):
    evs=[e for e in r.events if 't' in e]
    out=[]
    for a,b in zip(evs,evs[1:]):
        out.append((round(b['t']-a['t'],2), str(b.get('task') or b.get('name'))))
    out.sort(reverse=True)
    return out[:15]

def test_scratch(make_db):
    db = make_db(seed_calls=3000, cron=True)
    r = run_playbook(db, "phase1")
    print(r.duration, prof(r))
    r2 = run_playbook(db, "phase1", workdir=r.workdir, env={"ANSIBLE_PIPELINING":"1"})
    print(r2.duration, prof(r2))
    r3 = run_playbook(db, "phase1", workdir=r.workdir)
    print(r3.duration, prof(r3))
    assert r.ok
