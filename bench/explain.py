"""The query plans of the worker's catch-up queries on MongoDB, and their times.

Runs each query shape the store-worker sends for a catch-up page (store/mongo.rs) against a
database that holds a benchmark's data, with `explain("executionStats")`, and prints the
winning plan's stages and index, keys and documents examined, and the median of five timed
runs from this client.

    .venv/bin/python bench/explain.py mongodb://127.0.0.1:18857/?directConnection=true bench
"""

import statistics
import sys
import time
from datetime import timedelta

import pymongo


def stages(plan):
    """The plan's stages from the top, each with its index if it has one."""
    out = []
    while plan:
        name = plan.get("stage", "?")
        if plan.get("indexName"):
            name += f"({plan['indexName']})"
        out.append(name)
        plan = plan.get("inputStage") or (plan.get("inputStages") or [None])[0]
    return " <- ".join(out)


def show(label, cursor_of):
    explained = cursor_of().explain()
    stats = explained.get("executionStats", {})
    winning = explained.get("queryPlanner", {}).get("winningPlan", {})
    times = []
    found = 0
    for _ in range(5):
        started = time.perf_counter()
        found = len(list(cursor_of()))
        times.append((time.perf_counter() - started) * 1000)
    print(f"{label}")
    print(f"  plan: {stages(winning)}")
    print(
        f"  returned {found}, keys examined {stats.get('totalKeysExamined', '?')}, "
        f"docs examined {stats.get('totalDocsExamined', '?')}, "
        f"median {statistics.median(times):.1f} ms"
    )


def main():
    uri = sys.argv[1]
    db = pymongo.MongoClient(uri)[sys.argv[2] if len(sys.argv) > 2 else "mqtt"]
    messages, published = db.message, db.publishedMessage
    order = [("created", 1), ("_id", 1)]
    count = messages.estimated_document_count()
    middle = messages.find().sort(order).skip(count // 2).limit(1).next()
    at, after_id = middle["created"], middle["_id"]
    page = 2000
    print(f"{count} messages; a page of {page} from the middle of the history\n")
    show(
        "message: the rest of the cursor's millisecond",
        lambda: messages.find({"created": at, "_id": {"$gt": after_id}}).sort(order).limit(page),
    )
    # A session's catch-up by topic (`messages_on`): its exact topic after the cursor, then a
    # prefix (a filter such as `dev/#`) as the topic itself or a range of the topics under it.
    topic = middle["topic"]
    show(
        f"message: one topic ({topic}) after the cursor (topic_created_id)",
        lambda: messages.find({"topic": topic, "created": {"$gt": at}}).sort(order).limit(page),
    )
    # A prefix is two queries (a single `$or` was planned as a scan of `created`): the topic
    # itself, and the range of the topics under it; each counted first (at most 20,001).
    prefix = "/".join(topic.split("/")[:2])
    under = {"topic": {"$gte": prefix + "/", "$lt": prefix + "0"}}
    show(
        f"message: the prefix's own topic ({prefix}) after the cursor",
        lambda: messages.find({"topic": prefix, "created": {"$gt": at}}).sort(order).limit(page),
    )
    show(
        f"message: the topics under the prefix ({prefix}/#) after the cursor, a page",
        lambda: messages.find({**under, "created": {"$gt": at}}).sort(order).limit(page),
    )
    window = {"$gt": at, "$lte": at + timedelta(milliseconds=100)}
    show(
        "message: a 100 ms window after it",
        lambda: messages.find({"created": window}).sort(order).limit(page),
    )
    show(
        "message: the same window, other hosts' messages only (cluster catch-up)",
        lambda: messages.find({"host": {"$ne": "elsewhere"}, "created": window})
        .sort(order)
        .limit(page),
    )
    ids = [d["_id"] for d in messages.find({"created": {"$gte": at}}, {"_id": 1}).sort(order).limit(page)]
    client = published.find_one({}, {"clientId": 1})
    client = client["clientId"] if client else "nobody"
    show(
        f"publishedMessage: {client}'s records among a page (ids within a minute: one range)",
        lambda: published.find(
            {"clientId": client, "messageId": {"$gte": min(ids), "$lte": max(ids)}},
            {"messageId": 1, "_id": 0},
        ),
    )
    show(
        f"publishedMessage: the same as $in (ids spread over more than a minute)",
        lambda: published.find(
            {"clientId": client, "messageId": {"$in": ids}}, {"messageId": 1, "_id": 0}
        ),
    )
    show(
        "subscription: a client's subscriptions",
        lambda: db.subscription.find({"clientId": client}),
    )


if __name__ == "__main__":
    main()
