"""The bound on the gateway's answer to a subscribe (consumer.answers), without sockets."""

from __future__ import annotations

from consumer.answers import PendingAnswers, ReadingClock


def always(_project_id: int) -> bool:
    return True


def test_an_unanswered_subscribe_is_overdue_its_timeout_after_it_was_sent():
    answers = PendingAnswers(10.0)
    answers.start(0.0)
    answers.asking(1, 2.0)
    assert answers.overdue(11.9, always) == (None, 12.0)
    assert answers.overdue(12.0, always) == (1, 0.0)


def test_an_answered_subscribe_is_never_overdue():
    answers = PendingAnswers(10.0)
    answers.start(0.0)
    answers.asking(1, 0.0)
    answers.answered(1, 3.0)
    assert 1 not in answers
    assert answers.overdue(1000.0, always) == (None, float("inf"))


def test_any_answer_pushes_back_every_subscribe_waiting_behind_it():
    # The gateway answers a connection's subscribes one after the other: while it answers one
    # (its replay, then `subscribed`), the ones sent with it wait, and are not late.
    answers = PendingAnswers(10.0)
    answers.start(0.0)
    for project_id in (1, 2, 3):
        answers.asking(project_id, 0.0)
    answers.heard(1, 8.0)  # project 1's replay
    answers.answered(1, 9.0)
    assert answers.overdue(18.0, always) == (None, 19.0)
    answers.heard(2, 17.0)
    assert answers.overdue(26.5, always) == (None, 27.0)
    assert answers.overdue(27.0, always)[0] in (2, 3)


def test_a_frame_of_a_project_not_asked_about_is_no_answer():
    # A live event of a project whose subscribe was answered earlier (or never sent) comes
    # whether or not the gateway handles the pending subscribe: it pushes nothing back.
    answers = PendingAnswers(10.0)
    answers.start(0.0)
    answers.asking(1, 0.0)
    answers.heard(2, 9.0)
    answers.answered(2, 9.5)
    assert answers.overdue(10.0, always) == (1, 0.0)


def test_the_token_answer_pushes_back_the_subscribes_sent_with_it():
    answers = PendingAnswers(10.0)
    answers.start(0.0)
    answers.asking(1, 0.0)
    answers.progressed(7.0)  # authenticated, after a slow token check
    assert answers.overdue(16.0, always) == (None, 17.0)


def test_projects_no_longer_waiting_are_forgotten():
    answers = PendingAnswers(10.0)
    answers.start(0.0)
    answers.asking(1, 0.0)
    answers.asking(2, 5.0)
    assert answers.overdue(11.0, lambda project_id: project_id != 1) == (None, 15.0)
    assert 1 not in answers and 2 in answers


def test_a_new_connection_starts_with_nothing_asked():
    answers = PendingAnswers(10.0)
    answers.asking(1, 0.0)
    answers.start(50.0)
    assert answers.overdue(100.0, always) == (None, float("inf"))


def test_the_reading_clock_stands_still_while_paused_and_pauses_add_up():
    now = [100.0]
    clock = ReadingClock(lambda: now[0])
    assert clock.now() == 100.0
    clock.pause()
    assert clock.paused
    now[0] = 130.0
    assert clock.now() == 100.0  # waiting for the caller: the gateway's time does not run
    clock.resume()
    assert not clock.paused
    now[0] = 140.0
    assert clock.now() == 110.0
    clock.pause()
    clock.pause()  # (a second pause changes nothing)
    now[0] = 150.0
    clock.resume()
    clock.resume()
    assert clock.now() == 110.0
